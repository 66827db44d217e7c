"""Language-model measurements of one model on packed validation sequences, the same for every model of the
chain: validation loss and perplexity, MoE expert balance (MaxVio per layer over the routed tokens) and MTP
self-speculative acceptance (v3flow/model/generate.py)."""

from __future__ import annotations

import math

import torch

from v3flow.model.generate import acceptance_summary, speculative
from v3flow.model.moe import max_violation
from v3flow.model.transformer import IGNORE, Transformer
from v3flow.training.data import PackedSequences


@torch.no_grad()
def loss_and_balance(model: Transformer, val: PackedSequences, batches: int, micro_batch: int,
                     document_mask: bool = False) -> dict:
    """Validation loss and perplexity over the first `batches` x `micro_batch` sequences (each document attending
    only to itself with `document_mask`), and the MaxVio of each MoE layer over the tokens routed while scoring
    them (0 = every expert got the same share)."""
    model.eval()
    counts: list[torch.Tensor] = []

    def count(i: int):
        def hook(_module, _inputs, output):
            counts[i] += torch.bincount(output[1].flatten(), minlength=counts[i].numel())
        return hook

    moes = model.moe_layers()
    counts = [torch.zeros(m.cfg.n_routed_experts, dtype=torch.long) for m in moes]
    handles = [m.gate.register_forward_hook(count(i)) for i, m in enumerate(moes)]
    total, tokens, per_batch = 0.0, 0, []
    try:
        for b in range(min(batches, math.ceil(val.size / micro_batch))):
            rows = torch.arange(b * micro_batch, min((b + 1) * micro_batch, val.size)).numpy()
            inputs, targets = val.inputs_targets(val.rows(rows))
            logits = model(inputs, documents=val.documents(inputs) if document_mask else None)
            valid = targets != IGNORE
            loss = float(torch.nn.functional.cross_entropy(logits[valid].float(), targets[valid], reduction="sum"))
            total, tokens = total + loss, tokens + int(valid.sum())
            per_batch.append({"batch": b, "loss": loss / max(int(valid.sum()), 1), "tokens": int(valid.sum())})
    finally:
        for h in handles:
            h.remove()
    mean = total / max(tokens, 1)
    out = {"val_loss": mean, "val_perplexity": math.exp(min(mean, 50)), "val_tokens": tokens}
    vio = [max_violation(c) for c in counts]
    out.update({f"maxvio_layer_{i}": v for i, v in enumerate(vio)})
    if vio:
        out["maxvio_mean"] = sum(vio) / len(vio)
    return {"metrics": out, "batches": per_batch}


@torch.no_grad()
def mtp_acceptance(model: Transformer, val: PackedSequences, prompts: int, prompt_len: int = 32,
                   new_tokens: int = 64) -> dict[str, float]:
    """Self-speculative decoding from `prompts` prompts spread over the validation split: how often the MTP
    draft is the main model's own next token (pooled, with a per-prompt clustered standard error). Empty for a
    model without an MTP module."""
    if not len(model.mtp):
        return {}
    model.eval()
    length = min(prompt_len, val.seq_len - new_tokens - 2)
    rows = torch.linspace(0, val.size - 1, min(prompts, val.size)).long()
    device = next(model.parameters()).device
    return acceptance_summary([speculative(model, seq[None, :length].to(device), new_tokens)[1]
                               for seq in val.rows(rows.numpy())])
