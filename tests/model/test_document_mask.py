"""Intra-document masking (`pretrain.document_mask`): a packed document is computed as if it were alone."""

from __future__ import annotations

import torch

from flows.config import load_config
from tests.conftest import MICRO
from v3flow.model.transformer import IGNORE, Transformer, documents

EOS = 1


def test_document_indices_end_at_eos():
    tokens = torch.tensor([[7, 8, EOS, 9, EOS, 5, 6]])
    assert documents(tokens, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 2]]


def test_a_masked_packed_document_equals_the_document_alone():
    torch.manual_seed(0)
    cfg = load_config(MICRO, []).model
    model = Transformer(cfg)
    model.init_weights()
    model.eval()
    first = torch.randint(6, cfg.vocab_size, (1, 9))
    second = torch.randint(6, cfg.vocab_size, (1, 12))
    eos = torch.tensor([[EOS]])
    alone = torch.cat([second, eos], 1)
    packed = torch.cat([first, eos, alone], 1)
    with torch.no_grad():
        masked = model(packed, documents=documents(packed, EOS))[:, first.shape[1] + 1:]
        plain = model(packed)[:, first.shape[1] + 1:]
        reference = model(alone)
    # RoPE is relative: the shifted positions change nothing but rounding; without the mask the first document
    # is seen and changes every logit
    assert torch.allclose(masked, reference, atol=1e-4, rtol=1e-4)
    assert (plain - reference).abs().max() > 1e-2

    # the training losses too (MTP included), on the second document's targets only; its first target is left
    # out, as the MTP module predicts it from the position before the document (the first document's EOS), which
    # the document alone does not have
    targets = torch.cat([packed[:, 1:], torch.tensor([[IGNORE]])], 1)
    targets[:, : first.shape[1] + 2] = IGNORE
    alone_targets = torch.cat([alone[:, 1:], torch.tensor([[IGNORE]])], 1)
    alone_targets[:, 0] = IGNORE
    with torch.no_grad():
        packed_loss = model(packed, targets, mtp_weight=1.0, documents=documents(packed, EOS))
        alone_loss = model(alone, alone_targets, mtp_weight=1.0)
    assert torch.allclose(packed_loss.lm_loss, alone_loss.lm_loss, atol=1e-5)
    assert torch.allclose(packed_loss.mtp_loss, alone_loss.mtp_loss, atol=1e-5)
