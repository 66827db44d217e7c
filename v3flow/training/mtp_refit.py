"""Refitting the MTP module after post-training (the module: report §2.2, v3flow/model/mtp.py; the refit is ours).

TRL trains transformers' DeepseekV3ForCausalLM, which has no MTP module, so post-training moves the trunk's final
hidden states h^0 away from what the MTP module learned to read (self-speculative acceptance 0.77 -> 0.34,
measured). The refit trains the parameters under `model.mtp` and nothing else on the MTP loss L_MTP (before
lambda) of packed pretraining sequences:

    h^0          the frozen trunk's final-norm hidden states, computed under no_grad
    trained      enorm, hnorm, eh_proj (M_k), the block TRM_k, the shared head's norm
    frozen       the trunk, the shared embedding and output head (the main model's own tensors), every router bias
                 (the MTP block's included: no bias update during the refit)

AdamW with pretraining's betas and weight decay (report §4.2), FP32, gradient clipping at 1.0; the learning rate
warms up linearly over the first tenth of the steps, then follows a cosine down to a tenth of its peak. The
sequences are read in a seeded order, so the same inputs give the same module. Pretraining text, not the
post-training data: the MTP module drafts for whatever the model serves, and the packed corpus is at hand for
every chain. posttrain.train runs it on the trained model before the artifact is written (posttrain.py).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from v3flow.model.transformer import IGNORE, Transformer, documents
from v3flow.training.data import PackedSequences
from v3flow.training.posttrain_recipe import RouterAndMtp

BETAS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.95), 0.1, 1.0  # pretraining's AdamW (report §4.2)


def _pairs(rows: np.ndarray, pad_id: int | None, eos: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Token rows [B, T] -> inputs [B, T-1], next-token targets (padding masked from the loss) and, given the `eos`
    that ends each packed document, the document index of every input (attention within documents)."""
    seqs = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    targets = seqs[:, 1:].clone()
    if pad_id is not None:
        targets[targets == pad_id] = IGNORE
    inputs = seqs[:, :-1]
    return inputs, targets, documents(inputs, eos) if eos is not None else None


@torch.no_grad()
def mtp_loss_on(model: Transformer, sequences: np.ndarray, micro_batch: int, pad_id: int | None = None,
                eos: int | None = None) -> float:
    """L_MTP (before lambda) over `sequences` [N, T], weighted by each batch's targets."""
    total, weight = 0.0, 0
    for i in range(0, len(sequences), micro_batch):
        inputs, targets, docs = _pairs(sequences[i: i + micro_batch], pad_id, eos)
        n = int((targets != IGNORE).sum())
        total += float(model.mtp_loss(model.hidden(inputs, docs), inputs, targets, docs)) * n  # mtp_loss divides by n
        weight += n
    return total / max(weight, 1)


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def refit_mtp(model: Transformer, sequences: np.ndarray, steps: int, lr: float, micro_batch: int, seed: int,
              pad_id: int | None = None, held: np.ndarray | None = None, log: str = "",
              eos: int | None = None) -> dict[str, float]:
    """Train `model.mtp` alone for `steps` AdamW steps of `micro_batch` rows of `sequences` ([N, T] token ids, in a
    seeded order, epoch after epoch). Every other parameter keeps its values and, afterwards, its requires_grad.
    Returns the training MTP loss of the first and last step and, given `held` sequences, the MTP loss on them
    before and after. `log`: a prefix for progress lines (none when empty). `eos`: for a model trained with
    intra-document masking, the token that ends each packed document (attention stays within documents)."""
    if not len(model.mtp):
        raise ValueError("refit_mtp: the model has no MTP module (model.mtp_depth = 0); use mtp=carry")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(sequences)) for _ in range(-(-steps * micro_batch // len(sequences)))])
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("mtp."))
    params = list(model.mtp.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    was_training = model.training
    model.eval()  # eval: the MoE layers count no loads and compute no balance loss; nothing else differs
    out: dict[str, float] = {}
    try:
        if held is not None:
            out["held_loss_before"] = mtp_loss_on(model, held, micro_batch, pad_id, eos)
        started, losses = time.time(), []
        for step in range(steps):
            inputs, targets, docs = _pairs(sequences[order[step * micro_batch: (step + 1) * micro_batch]], pad_id, eos)
            with torch.no_grad():
                h = model.hidden(inputs, docs)  # [B, T-1, dim], h^0 of the frozen trunk
            loss = model.mtp_loss(h, inputs, targets, docs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if log and ((step + 1) % 10 == 0 or step + 1 == steps):
                rate = (step + 1) * inputs.numel() / (time.time() - started)
                print(f"{log} MTP refit step {step + 1}/{steps}  loss {losses[-1]:.4f}  {rate:,.0f} tokens/s",
                      flush=True)
        out.update({"loss_first": losses[0], "loss_last": losses[-1]})
        if held is not None:
            out["held_loss_after"] = mtp_loss_on(model, held, micro_batch, pad_id, eos)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(grads[name])
        model.train(was_training)
    return out


def refit_from_packed(model: Transformer, manifest: Path, settings: RouterAndMtp, seed: int,
                      log: str = "", document_mask: bool = False) -> dict[str, float]:
    """`refit_mtp` on a pack stage's output (`packed/manifest.json`): `mtp_refit_steps x mtp_refit_batch` train
    sequences in the seeded order our loop reads them, the first `mtp_refit_eval` val sequences held out; attended
    within each document when the model was trained so (`document_mask`)."""
    train, val = PackedSequences(manifest, "train"), PackedSequences(manifest, "val")
    sequences = train.batch(0, settings.mtp_refit_steps * settings.mtp_refit_batch, seed).numpy()
    held = val.rows(np.arange(min(settings.mtp_refit_eval, val.size))).numpy()
    return refit_mtp(model, sequences, settings.mtp_refit_steps, settings.mtp_refit_lr, settings.mtp_refit_batch,
                     seed, pad_id=train.pad_id, held=held, log=log, eos=train.eos_id if document_mask else None)
