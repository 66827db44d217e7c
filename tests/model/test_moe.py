"""Routing properties and auxiliary-loss-free balancing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from v3flow.model.moe import MoE, max_violation


def moe_layer(model):
    return model.moe_layers()[0]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_bias_changes_choice_but_not_gate_values(seed):
    from flows.config import load_config
    from tests.conftest import MICRO

    cfg = load_config(MICRO).model
    torch.manual_seed(seed)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.1)
    x = torch.randn(64, cfg.dim)
    gates, idx, scores = moe.gate(x)
    # gate values are the unbiased affinities of the chosen experts, normalised, times route_scale
    expected = scores.gather(1, idx)
    expected = expected / expected.sum(-1, keepdim=True) * cfg.route_scale
    assert torch.allclose(gates, expected, atol=1e-6)
    # a large bias on one expert pulls it into every token's selection...
    moe.gate.bias[3] = 10.0
    gates_b, idx_b, scores_b = moe.gate(x)
    assert (idx_b == 3).any(dim=1).all()
    assert torch.equal(scores_b, scores)  # ...without touching any affinity
    expected_b = scores.gather(1, idx_b)
    assert torch.allclose(gates_b, expected_b / expected_b.sum(-1, keepdim=True) * cfg.route_scale, atol=1e-6)


def test_group_limit_and_loads(model, cfg):
    moe = moe_layer(model)
    x = torch.randn(256, cfg.dim)
    _, idx, _ = moe.gate(x)
    per_group = cfg.n_routed_experts // cfg.n_expert_groups
    groups_used = torch.tensor([len(set((row // per_group).tolist())) for row in idx])
    assert groups_used.max() <= cfg.n_limited_groups
    assert all(len(set(row.tolist())) == cfg.n_activated_experts for row in idx)  # distinct experts
    moe.train()
    moe.loads.zero_()
    moe(x.view(4, 64, -1))
    assert moe.loads.sum() == 256 * cfg.n_activated_experts


def test_dispatch_matches_per_token_reference(model, cfg):
    moe = moe_layer(model)
    x = torch.randn(3, 7, cfg.dim)
    with torch.no_grad():
        out = moe(x).view(-1, cfg.dim)
        flat = x.view(-1, cfg.dim)
        gates, idx, _ = moe.gate(flat)
        e = moe.experts
        ref = torch.stack([
            sum(g * (e.w2[j] @ (torch.nn.functional.silu(e.w1[j] @ t) * (e.w3[j] @ t))) for g, j in zip(gs, js))
            + moe.shared(t)
            for t, gs, js in zip(flat, gates, idx)
        ])
    assert torch.allclose(out, ref, atol=1e-5)


def test_bias_updates_move_loads_toward_balance(cfg):
    torch.manual_seed(0)
    moe = MoE(cfg).train()
    torch.nn.init.normal_(moe.gate.weight, std=0.02)
    moe.gate.weight.data[:2] += 2.0  # two experts (of one group) start out heavily overloaded
    x = torch.randn(8, 64, cfg.dim)
    with torch.no_grad():
        moe(x)
        start = max_violation(moe.update_bias(0.0))
        for _ in range(300):
            moe(x)
            moe.update_bias(0.01)
        moe(x)
        end = max_violation(moe.update_bias(0.0))
    assert start > 0.75 and end < 0.4 * start, (start, end)


def test_sequence_balance_loss_is_one_when_uniform(cfg):
    moe = MoE(cfg)
    T, K, E = 8, cfg.n_activated_experts, cfg.n_routed_experts
    idx = torch.arange(T * K).remainder(E).view(1, T, K)  # every expert chosen equally often
    scores = torch.ones(1, T, E)
    assert torch.isclose(moe.sequence_balance_loss(idx, scores), torch.tensor(1.0))



def test_backward_is_bitwise_reproducible_on_several_threads(cfg):
    """Tokens reach the experts in expert order, so a token's K_r copies lie scattered: the gradient that sums
    them back must not depend on thread timing. (Advanced indexing's backward did, on 2 CPU threads with
    K_r >= 3, where the order of the additions changes the float sum.)"""
    torch.manual_seed(0)
    moe = MoE(cfg.model_copy(update={"n_activated_experts": 4, "n_limited_groups": cfg.n_expert_groups}))
    torch.nn.init.normal_(moe.gate.weight, std=0.1)
    for w in moe.experts.parameters():
        torch.nn.init.normal_(w, std=0.1)
    x = torch.randn(16, 256, cfg.dim, requires_grad=True)
    dy = torch.randn(16, 256, cfg.dim)

    def input_grad() -> torch.Tensor:
        x.grad = None
        moe(x).backward(dy)
        return x.grad.clone()

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = input_grad()
        assert all(torch.equal(first, input_grad()) for _ in range(20))
    finally:
        torch.set_num_threads(threads)


def test_gating_stays_fp32_under_bf16_autocast(model):
    """The report keeps MoE gating out of low precision: under the trainer's BF16 autocast the affinities and
    the routing must be the FP32 ones (autocast used to recast the gate's linear to BF16)."""
    gate = moe_layer(model).gate
    x = torch.randn(512, model.cfg.dim)
    gates, idx, scores = gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gates_ac, idx_ac, scores_ac = gate(x)
    assert scores_ac.dtype == torch.float32
    assert torch.equal(scores_ac, scores) and torch.equal(idx_ac, idx) and torch.equal(gates_ac, gates)


def test_eval_forward_has_no_stale_balance_loss(model):
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 33))
    model.train()
    assert float(model(tokens[:, :-1], tokens[:, 1:]).balance_loss) > 0
    model.eval()
    out = model(tokens[:, :-1], tokens[:, 1:])
    assert float(out.balance_loss) == 0.0 and torch.equal(out.loss, out.lm_loss)


@pytest.mark.parametrize("precision", ["fp32", "fp8"])
def test_dims_not_multiple_of_four_train(cfg, precision):
    """torch._grouped_mm needs 16-byte strides; dim / moe_inter_dim like 66 / 30 fall back to a loop over experts
    (it used to crash), and give what the experts compute one by one."""
    from v3flow.model.fp8 import convert_to_fp8
    from v3flow.model.moe import grouped_mm
    from v3flow.model.transformer import Transformer

    odd = cfg.model_copy(update={"dim": 66, "moe_inter_dim": 30})
    torch.manual_seed(0)
    model = Transformer(odd)
    model.init_weights()
    if precision == "fp8":
        convert_to_fp8(model)
    tokens = torch.randint(0, odd.vocab_size, (2, 33))
    out = model(tokens[:, :-1], tokens[:, 1:], mtp_weight=0.3)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    x, w = torch.randn(10, 30), torch.randn(3, 30, 66)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)
    want = torch.cat([x[:4] @ w[0], x[4:10] @ w[2]])
    assert torch.allclose(grouped_mm(x, w, offsets), want, atol=1e-5)
