"""Training precision: AdamW with BF16 moments, and a short FP8 run whose loss falls."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.stages.pretrain.conftest import losses, write_run
from v3flow.training.checkpoint import latest
from v3flow.training.optim import AdamW
from v3flow.training.train import run_loop


def params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 32, generator=g)), torch.nn.Parameter(torch.randn(32, generator=g))]


def run_steps(opt: torch.optim.Optimizer, ps: list[torch.nn.Parameter], steps: int = 20) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_fp32_moments_match_torch_adamw():
    ours, theirs = params(), params()
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    run_steps(AdamW(ours, moment_dtype=torch.float32, **kw), ours)
    run_steps(torch.optim.AdamW(theirs, **kw), theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bf16_moments_fp32_params_and_reload():
    ps = params()
    opt = AdamW(ps, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    run_steps(opt, ps, 3)
    for p in ps:
        assert p.dtype == torch.float32
        assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16
    # Optimizer.load_state_dict casts the moments to the parameter dtype; the next step restores BF16
    copy = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    reloaded = AdamW(copy, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    reloaded.load_state_dict(opt.state_dict())
    run_steps(opt, ps, 2)
    run_steps(reloaded, copy, 2)
    for a, b in zip(ps, copy):
        assert torch.equal(a, b)
        assert reloaded.state[b]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("overrides", [["pretrain.precision=fp8"],
                                       ["pretrain.precision=bf16", "pretrain.document_mask=true"]])
def test_short_run_loss_falls_and_moments_are_bf16(tmp_path, micro_data, overrides):
    """The bf16 run also attends within documents only (the loop's masked training and validation passes)."""
    run_loop(write_run(tmp_path, micro_data, overrides).pretrain, tmp_path)
    curve = losses(tmp_path)
    first, last = curve[min(curve)]["loss"], curve[max(curve)]["loss"]
    assert last < first - 0.5, (first, last)
    state = load_file(str(latest(tmp_path / "checkpoints") / "optimizer.safetensors"))
    moments = [t for k, t in state.items() if k.endswith(("exp_avg", "exp_avg_sq"))]
    assert moments and all(t.dtype == torch.bfloat16 for t in moments)
    weights = load_file(str(latest(tmp_path / "checkpoints") / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
