"""Shapes, causality, cached decoding, losses."""

from __future__ import annotations

import torch

from v3flow.model.transformer import IGNORE


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
