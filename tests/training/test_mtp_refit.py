"""The MTP refit on the micro architecture: it lowers the MTP loss on held-out sequences, touches nothing outside
`model.mtp` (every other tensor bit-identical, requires_grad as before), and the same seed gives the same module."""

from __future__ import annotations

import numpy as np
import torch

from flows.config import load_config
from tests.conftest import MICRO
from v3flow.model.transformer import Transformer
from v3flow.training.mtp_refit import mtp_loss_on, refit_mtp


def counting(n: int, length: int, seed: int) -> np.ndarray:
    """Rows t_{i+1} = t_i + 1 from random starts: the token after next is learnable from the next token."""
    return (np.random.default_rng(seed).integers(10, 900, (n, 1)) + np.arange(length)).astype(np.uint32)


def micro_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(load_config(MICRO).model)
    model.init_weights()
    for moe in model.moe_layers():
        moe.gate.bias.normal_(0, 0.05)
    return model


def test_refit_lowers_the_held_out_mtp_loss_and_touches_only_the_mtp_module():
    model = micro_model()
    model.layers[0].attn_norm.weight.requires_grad_(False)  # a caller's choice the refit must give back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    train, held = counting(64, 25, seed=0), counting(8, 25, seed=1)
    out = refit_mtp(model, train, steps=15, lr=1e-2, micro_batch=4, seed=0, held=held)
    assert out["held_loss_after"] < out["held_loss_before"] - 0.2  # the head stays frozen and random: slow going
    assert out["held_loss_before"] == mtp_loss_on(micro_model(), held, 4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("mtp."))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("mtp.") and k.endswith("gate.bias"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("mtp."))
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    again = micro_model()
    refit_mtp(again, train, steps=15, lr=1e-2, micro_batch=4, seed=0)
    assert all(torch.equal(v, after[k]) for k, v in again.state_dict().items())  # seeded: the same module


def test_a_document_masked_model_is_refit_within_documents():
    """Given the EOS that ends each packed document, the refit's loss attends within documents: the same as
    without where rows hold one document, different where a row holds two."""
    model, rows = micro_model(), counting(4, 25, seed=2)
    eos = int(rows.max()) + 1
    assert mtp_loss_on(model, rows, 4, eos=eos) == mtp_loss_on(model, rows, 4)
    rows[:, 12] = eos
    assert mtp_loss_on(model, rows, 4, eos=eos) != mtp_loss_on(model, rows, 4)
