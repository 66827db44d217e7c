"""Long-context evaluation: position buckets against a direct computation, passkey prompts that fit and
put the needle where asked, and the cached scoring against full forward passes."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flows.config import load_config
from stages.data.bpe import train_bpe
from tests.conftest import MICRO
from v3flow.evaluation import long_context as lc
from v3flow.model.generate import greedy
from v3flow.model.transformer import Transformer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
HAYSTACK = [(STDLIB / name).read_text() for name in ("json/decoder.py", "json/encoder.py", "textwrap.py")]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(HAYSTACK * 2, vocab_size=1024, min_frequency=2, max_chars=10**6)


@pytest.fixture(scope="module")
def model():
    cfg = load_config(MICRO, ["model.max_seq_len=512"]).model
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.init_weights()
    return m.eval()


def test_bucket_edges():
    assert lc.bucket_edges(512, 4096) == [0, 512, 1024, 2048, 4096]
    assert lc.bucket_edges(128, 300) == [0, 128, 256, 300]


def test_position_losses_match_a_direct_computation(model):
    torch.manual_seed(1)
    docs = [torch.randint(0, model.cfg.vocab_size, (n,)) for n in (257, 300, 100)]  # the last is too short
    out = lc.position_losses(model, docs, [0, 64, 128, 256])
    with torch.no_grad():
        nll = torch.cat([F.cross_entropy(model(d[None, :256])[0], d[1:257], reduction="none")[None] for d in docs[:2]])
    assert list(out) == ["0-64", "64-128", "128-256"]
    assert out["0-64"]["tokens"] == 128 and out["128-256"]["tokens"] == 256
    for name, (lo, hi) in zip(out, [(0, 64), (64, 128), (128, 256)]):
        assert out[name]["loss"] == pytest.approx(float(nll[:, lo:hi].mean()), rel=1e-5)


def test_passkey_prompts_fit_put_the_needle_at_its_depth_and_repeat(tokenizer):
    prompts = lc.passkey_prompts(tokenizer, HAYSTACK, [256, 480], [0.1, 0.5, 0.9], trials=2, seed=7)
    assert len(prompts) == 12
    assert [p.key for p in prompts] == [p.key for p in lc.passkey_prompts(tokenizer, HAYSTACK, [256, 480],
                                                                          [0.1, 0.5, 0.9], 2, 7)]
    assert len({p.key for p in prompts}) > 6
    for p in prompts:
        assert p.length - 40 <= len(p.prompt_ids) + len(p.key_ids) <= p.length
        text = tokenizer.decode(p.prompt_ids)
        assert lc.NEEDLE.format(key=p.key) in text and text.endswith(lc.QUESTION) and text.count(p.key) == 1
        haystack = len(p.prompt_ids) - len(tokenizer.encode(lc.INTRO + lc.NEEDLE.format(key=p.key) + lc.QUESTION).ids)
        intro = len(tokenizer.encode(lc.INTRO).ids)
        assert abs((p.needle_position - intro) / haystack - p.depth) < 0.1, (p.needle_position, haystack)


def test_cached_scoring_equals_full_forward_passes(model, tokenizer):
    p = lc.passkey_prompts(tokenizer, HAYSTACK, [300], [0.5], trials=1, seed=3)[0]
    scored = lc.score_passkey(model, tokenizer, p, distractors=5)
    candidates = [p.key_ids, *lc._distractors(tokenizer, p, 5)]
    K = len(p.key_ids)

    @torch.no_grad()
    def full(c: list[int]) -> float:
        seq = torch.tensor([p.prompt_ids + c])
        logp = model(seq[:, :-1])[0, -K:].float().log_softmax(-1)
        return float(logp.gather(-1, torch.tensor(c)[:, None]).sum())

    logps = [full(c) for c in candidates]
    assert scored["key_logprob"] * K == pytest.approx(logps[0], abs=1e-3)
    assert scored["rank"] == 1 + sum(lp > logps[0] for lp in logps[1:]) and scored["candidates"] == 6
    expected = greedy(model, torch.tensor([p.prompt_ids]), K)[0, -K:].tolist()
    assert scored["exact_match"] == float(expected == p.key_ids)
    assert scored["greedy"] == tokenizer.decode(expected)
    chunked = lc.score_passkey(model, tokenizer, p, distractors=5, chunk=64)  # prefill 64 tokens at a time
    assert chunked["key_logprob"] == pytest.approx(scored["key_logprob"], abs=1e-5)
    assert chunked["rank"] == scored["rank"]


def test_grid_summary_and_heatmap(model, tokenizer):
    prompts = lc.passkey_prompts(tokenizer, HAYSTACK, [128, 256], [0.25, 0.75], trials=1, seed=1)
    records = lc.passkey_grid(model, tokenizer, prompts, distractors=3)
    summary = lc.summarize(records)
    assert 1 <= summary["passkey_rank"] <= 4 and 0 <= summary["passkey_top1"] <= 1
    assert {"length", "depth", "key", "rank", "prompt_tokens"} <= records[0].keys()
    fig = lc.heatmap(records)
    assert len(fig.axes[0].texts) == 4
