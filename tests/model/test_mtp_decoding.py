"""MTP: its loss trains, and self-speculative decoding returns exactly the main model's greedy output."""

from __future__ import annotations

import pytest
import torch

from v3flow.model.generate import SpeculativeStats, acceptance_summary, greedy, speculative
from v3flow.model.transformer import Transformer


@pytest.fixture(scope="module")
def trained(request):
    """A micro model trained for a few seconds on sequences that follow a fixed random permutation."""
    from flows.config import load_config
    from tests.conftest import MICRO

    cfg = load_config(MICRO).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    vocab = 64
    successor = torch.randperm(vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(150):
        start = torch.randint(0, vocab, (16, 1))
        seq = [start]
        for _ in range(32):
            seq.append(successor[seq[-1]])
        seq = torch.cat(seq, dim=1)
        out = model(seq[:, :-1], seq[:, 1:], mtp_weight=0.3, balance_alpha=1e-4)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        for moe in model.moe_layers():
            moe.update_bias(1e-3)
        losses.append((out.lm_loss.item(), out.mtp_loss.item()))
    return model.eval(), successor, losses


def test_main_and_mtp_losses_fall(trained):
    _, _, losses = trained
    first, last = losses[0], losses[-1]
    assert last[0] < 0.2 * first[0] and last[1] < 0.2 * first[1], (first, last)


def test_speculative_equals_greedy_and_accepts_drafts(trained):
    model, _, _ = trained
    model.double()
    for seed in range(3):
        torch.manual_seed(seed)
        prompt = torch.randint(0, 64, (1, 6))
        reference = greedy(model, prompt, 30)
        tokens, stats = speculative(model, prompt, 30)
        assert torch.equal(tokens, reference)
        assert stats.acceptance_rate > 0.8 and stats.tokens_per_pass > 1.6, stats


def test_speculative_on_untrained_model_is_still_exact(model, cfg):
    model.double()
    prompt = torch.randint(0, cfg.vocab_size, (1, 9))
    tokens, stats = speculative(model, prompt, 25)
    assert torch.equal(tokens, greedy(model, prompt, 25))
    assert stats.tokens == 25 and stats.main_passes <= 26


def test_acceptance_summary_pools_drafts_and_clusters_the_error():
    looping, wrong = SpeculativeStats(10, 10, 6, 16), SpeculativeStats(10, 0, 10, 10)
    s = acceptance_summary([looping, wrong])
    assert s["mtp_acceptance_rate"] == 0.5 and s["mtp_drafted_tokens"] == 20 and s["mtp_prompts"] == 2
    assert s["mtp_acceptance_stderr"] == pytest.approx(0.5)  # residuals +-5 drafts, over a mean of 10 per prompt
    assert s["mtp_tokens_per_pass"] == pytest.approx(26 / 16)
    same = acceptance_summary([SpeculativeStats(8, 6, 5, 14)] * 3)
    assert same["mtp_acceptance_rate"] == 0.75 and same["mtp_acceptance_stderr"] == 0.0
