"""Faults the tests inject into the training loop through its callbacks (v3flow/training/loop.py), in the trainer
process: `run_loop(..., env=faults.env(kill_at=8))`, or the same variables set around a stage's run."""

from __future__ import annotations

import json
import math
import os
import signal

from v3flow.training.loop import CALLBACKS_ENV, Callback


class KillAtStep(Callback):
    """SIGKILL before a step: the process dies without any cleanup, as on a lost node."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, trainer) -> None:
        if trainer.state["step"] == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class NanAtSteps(Callback):
    """A corrupted step: its loss is NaN, once per step (a rollback replays the step number past its data)."""

    def __init__(self, steps: list[int]):
        self.steps, self.fired = set(steps), set()

    def on_loss(self, trainer, loss: float) -> float:
        step = trainer.state["step"]
        if step in self.steps and step not in self.fired:
            self.fired.add(step)
            return math.nan
        return loss


def env(kill_at: int | None = None, nan_at: tuple[int, ...] = ()) -> dict[str, str]:
    """The environment that installs the faults in a trainer process."""
    callbacks = [{"target": f"{__name__}:KillAtStep", "step": kill_at}] if kill_at is not None else []
    callbacks += [{"target": f"{__name__}:NanAtSteps", "steps": list(nan_at)}] if nan_at else []
    return {CALLBACKS_ENV: json.dumps(callbacks)}
