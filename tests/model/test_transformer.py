"""Shapes, causality, cached decoding, losses."""

from __future__ import annotations

import pytest
import torch

from v3flow.model.transformer import IGNORE, Transformer


def test_shapes_and_causality(model, cfg):
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        logits = model(tokens)
        changed = tokens.clone()
        changed[:, 12:] = (changed[:, 12:] + 1) % cfg.vocab_size
        later = model(changed)
    assert logits.shape == (2, 24, cfg.vocab_size)
    assert torch.allclose(logits[:, :12], later[:, :12], atol=1e-6)  # the future never leaks back
    assert not torch.allclose(logits[:, 12:], later[:, 12:])


def test_cached_absorbed_decoding_equals_full_forward(model, cfg):
    model.double()
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        full = model.head(model.hidden(tokens))
        cache = model.new_cache(2, 40)
        parts = [model.head(model.hidden_cached(tokens[:, :17], cache, 0))]
        parts += [model.head(model.hidden_cached(tokens[:, i:i + 1], cache, i)) for i in range(17, 40)]
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-10


def test_cache_holds_only_latent_and_rope_key(model, cfg):
    cache = model.new_cache(1, 16)[0]
    assert cache.kv.shape == (1, 16, cfg.kv_lora_rank) and cache.pe.shape == (1, 16, cfg.qk_rope_head_dim)


def test_losses_and_gradients(model, cfg):
    model.train()
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    targets = tokens[:, 1:].clone()
    targets[:, -3:] = IGNORE
    out = model(tokens[:, :-1], targets, mtp_weight=0.3, balance_alpha=1e-4)
    assert torch.isfinite(out.loss) and out.mtp_loss > 0 and out.balance_loss > 0
    expected = out.lm_loss + 0.3 * out.mtp_loss + 1e-4 * out.balance_loss
    assert torch.allclose(out.loss.detach(), expected)
    out.loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert all(m.gate.weight.grad is not None for m in model.moe_layers())
    assert all(m.gate.bias.grad is None for m in model.moe_layers())  # the bias is outside autograd


@pytest.mark.parametrize("recompute", ["attention", "blocks"])
def test_memory_efficient_attention_and_recompute_change_nothing(cfg, recompute):
    """The fused kernel (never the T x T scores; q, k, v padded to one head size) and recomputation in the
    backward pass (attention sublayers; or whole blocks with a chunked head and loss) give the plain model's
    losses, gradients and expert loads (a replayed MoE layer counts nothing), under the same parameter names."""
    from v3flow.model.attention import set_attention_kernel
    from v3flow.model.transformer import checkpoint_activations

    torch.manual_seed(0)
    ref = Transformer(cfg)
    ref.init_weights()
    lean = Transformer(cfg)
    lean.load_state_dict(ref.state_dict())
    set_attention_kernel(lean, "memory_efficient")
    checkpoint_activations(lean, recompute, loss_chunk=100)
    assert lean.state_dict().keys() == ref.state_dict().keys()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len + 1))
    runs = []
    for m in (ref, lean):
        m.train()
        out = m(tokens[:, :-1], tokens[:, 1:], mtp_weight=0.3, balance_alpha=1e-4)
        out.loss.backward()
        runs.append((out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None},
                     [moe.loads.clone() for moe in m.moe_layers()]))
    (a, ga, la), (b, gb, lb) = runs
    assert torch.allclose(a.lm_loss, b.lm_loss, atol=1e-5) and torch.allclose(a.mtp_loss, b.mtp_loss, atol=1e-5)
    assert torch.allclose(a.balance_loss, b.balance_loss, atol=1e-6) and ga.keys() == gb.keys()
    assert all(torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4) for n in ga)
    assert all(torch.equal(x, y) for x, y in zip(la, lb, strict=True)) and la[0].sum() > 0
    with pytest.raises(ValueError, match="attention kernel 'flash'"):
        set_attention_kernel(lean, "flash")
