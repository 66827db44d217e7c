"""The loss-spike guard of the training loop: what it skips and what it must not."""

from __future__ import annotations

import math
from types import SimpleNamespace

from v3flow.training.loop import Trainer
from v3flow.training.recipe import GuardConfig


def _loop(**guards) -> SimpleNamespace:
    events = []
    loop = SimpleNamespace(
        state={"step": 0, "ema": None, "ema_steps": 0, "skips": 0, "skipped_total": 0},
        cfg=SimpleNamespace(guards=GuardConfig(**guards)), opt=SimpleNamespace(zero_grad=lambda set_to_none: None),
        raw=SimpleNamespace(moe_layers=list), monitor=SimpleNamespace(event=lambda step, text: events.append(text)),
        events=events)
    return loop


def _feed(loop, losses) -> list[bool]:
    applied = []
    for loss in losses:
        applied.append(Trainer._guard(loop, loss))
        loop.state["step"] += 1
    return applied


def test_a_lucky_first_batch_does_not_make_ordinary_batches_spikes():
    """Measured in a YaRN phase with one 4,096-token sequence a step: the first batch, a repeated long document,
    had loss 0.82 and the next ones 3.3-4.9; a running mean started from the first loss skipped them all."""
    loop = _loop()
    assert _feed(loop, [0.82, 3.83, 3.33, 3.09, 4.92, 1.2, 4.3, 4.2, 1.9, 3.9]) == [True] * 10
    assert math.isclose(loop.state["ema"], sum([0.82, 3.83, 3.33, 3.09, 4.92, 1.2, 4.3, 4.2, 1.9, 3.9]) / 10)  # plain mean


def test_spikes_and_non_finite_losses_are_skipped_once_the_mean_is_settled():
    loop = _loop(history=4)
    assert _feed(loop, [float("nan"), 2.0, 2.0, 2.0, 2.0]) == [False, True, True, True, True]  # NaN: always skipped
    assert _feed(loop, [7.0, 2.1]) == [False, True] and loop.state["skipped_total"] == 2
    assert "skipped update: loss 7" in loop.events[-1] and math.isclose(loop.state["ema"], 0.95 * 2.0 + 0.05 * 2.1)
