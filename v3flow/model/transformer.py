"""The DeepSeek-V3 transformer: embedding, L blocks (MLA + dense FFN or MoE), final norm, output head, and
D multi-token-prediction modules sharing the embedding and head.

The model knows nothing of how it is run: precision (FP8), distribution and checkpointing are applied
from outside. Shapes: B batch, T sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from v3flow.model.args import ModelConfig
from v3flow.model.attention import MLA, LatentCache, checkpoint_attention
from v3flow.model.layers import MLP, RMSNorm
from v3flow.model.moe import MoE
from v3flow.model.mtp import MTPModule
from v3flow.model.rope import rope_tables

IGNORE = -100  # targets with this value (e.g. padding) carry no loss


def documents(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """Packed tokens [B, T] whose documents each end with `eos` -> the document index of every token [B, T]."""
    ends = (tokens == eos).long()
    return ends.cumsum(1) - ends


def document_mask(documents: torch.Tensor | None) -> torch.Tensor | None:
    """Document indices [B, T] -> attention mask [B, 1, T, T]: causal, and within the token's own document."""
    if documents is None:
        return None
    T = documents.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    return ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MLP(cfg.dim, cfg.inter_dim) if layer_id < cfg.n_dense_layers else MoE(cfg)

    def forward(self, x: torch.Tensor, cos, sin, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.ffn(self.ffn_norm(x))

    def forward_cached(self, x: torch.Tensor, cos, sin, cache: LatentCache, start: int) -> torch.Tensor:
        x = x + self.attn.forward_cached(self.attn_norm(x), cos, sin, cache, start)
        return x + self.ffn(self.ffn_norm(x))


@dataclass
class Output:
    loss: torch.Tensor  # what the optimizer minimises: lm + lambda * mtp + alpha * balance
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor  # mean over depths, before lambda
    balance_loss: torch.Tensor  # sum over MoE layers, before alpha
    logits: torch.Tensor | None = None


def _summed_ce(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), targets, ignore_index=IGNORE, reduction="sum")


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # the MTP blocks are MoE layers, as layer 61 of the release is
        self.mtp = nn.ModuleList(MTPModule(cfg, Block(cfg, cfg.n_layers + k)) for k in range(cfg.mtp_depth))
        cos, sin = rope_tables(cfg, cfg.max_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.loss_chunk = 0  # > 0: head and cross-entropy `loss_chunk` tokens at a time (checkpoint_activations)

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std^2) for every weight matrix (report §4.2: 0.006); norms 1, router biases 0."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, self.cfg.init_std)
        for m in self.moe_layers():
            m.gate.bias.zero_()

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def hidden(self, tokens: torch.Tensor, documents: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> final-norm hidden states [B, T, D]. With `documents` [B, T] (a document index per
        token), each token attends only within its own document (intra-document masking)."""
        T = tokens.shape[1]
        mask = document_mask(documents)
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, self.cos[:T], self.sin[:T], mask)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, mtp_weight: float = 0.0,
                balance_alpha: float = 0.0, documents: torch.Tensor | None = None) -> Output | torch.Tensor:
        """Without targets: logits [B, T, V]. With targets [B, T] (next tokens): the training losses.
        `documents`: see `hidden`."""
        h = self.hidden(tokens, documents)
        if targets is None:
            return self.head(h)
        lm = self.cross_entropy(h, targets) / (targets != IGNORE).sum().clamp(min=1)
        mtp = self.mtp_loss(h, tokens, targets, documents) if len(self.mtp) else h.new_zeros(())
        balance = sum((m.balance_loss for m in self.moe_layers() if m.balance_loss is not None), h.new_zeros(()))
        loss = lm + mtp_weight * mtp + balance_alpha * balance
        return Output(loss, lm.detach(), mtp.detach(), balance.detach())

    def mtp_loss(self, h: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor,
                 documents: torch.Tensor | None = None) -> torch.Tensor:
        """(1/D) sum_k CE_k, CE_k summed over positions 0..T-k-1 and divided by the number of targets."""
        T = tokens.shape[1]
        valid = (targets != IGNORE).sum().clamp(min=1)
        total = h.new_zeros(())
        for k, module in enumerate(self.mtp, start=1):
            # position i sees h^{k-1}_i and Emb(t_{i+k}) = Emb(tokens[i + k]); it predicts targets[i + k]
            mask = None if documents is None else document_mask(documents[:, : T - k])
            h = module(h[:, : T - k], self.embed(tokens[:, k:]), self.cos[: T - k], self.sin[: T - k], mask)
            total = total + self.cross_entropy(module.norm(h), targets[:, k:]) / valid
        return total / len(self.mtp)

    def cross_entropy(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy of the head on hidden states h [B, T, D]. With `loss_chunk`, the logits
        of `loss_chunk` tokens at a time, recomputed in the backward pass: never the whole [B, T, V] (at 128K
        tokens and a 32K vocabulary that alone is 16 GiB in FP32)."""
        h, targets = h.flatten(0, 1), targets.flatten()
        if not self.loss_chunk or len(h) <= self.loss_chunk:
            return _summed_ce(self.head, h, targets)
        return sum(checkpoint(_summed_ce, self.head, h[i: i + self.loss_chunk], targets[i: i + self.loss_chunk],
                              use_reentrant=False) for i in range(0, len(h), self.loss_chunk))

    # ----------------------------------------------------------------------------------------- decoding
    def new_cache(self, batch: int, max_len: int) -> list[LatentCache]:
        """One latent cache per layer, then one per MTP block."""
        dtype, device = self.embed.weight.dtype, self.embed.weight.device
        n = self.cfg.n_layers + self.cfg.mtp_depth
        return [LatentCache.empty(self.cfg, batch, max_len, dtype, device) for _ in range(n)]

    def hidden_cached(self, tokens: torch.Tensor, cache: list[LatentCache], start: int) -> torch.Tensor:
        """Final-norm hidden states of tokens at positions start..start+S-1, reading and filling the cache."""
        end = start + tokens.shape[1]
        x = self.embed(tokens)
        for layer, c in zip(self.layers, cache):
            x = layer.forward_cached(x, self.cos[start:end], self.sin[start:end], c, start)
        return self.norm(x)


def checkpoint_activations(model: Transformer, kind: str, loss_chunk: int = 8192) -> None:
    """Trade compute for memory in training (parameter names and results unchanged):
    "attention"  recompute each MLA sublayer in the backward pass (selective recompute);
    "blocks"     recompute every block (MTP's too), keeping only block inputs, and compute head and loss
                 `loss_chunk` tokens at a time: what a 128K-token sequence needs on one GPU. A replayed MoE layer
                 does not count its tokens again (the expert loads that move the router biases);
    "none"       keep every activation."""
    if kind == "attention":
        checkpoint_attention(model)
    elif kind == "blocks":
        model.loss_chunk = loss_chunk
        blocks = [*model.layers, *(m.block for m in model.mtp)]
        for block in blocks:
            replay = functools.partial(_replaying, [m for m in block.modules() if isinstance(m, MoE)])
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False,
                                              context_fn=lambda r=replay: (contextlib.nullcontext(), r()))
    elif kind != "none":
        raise ValueError(f"activation checkpointing {kind!r}: expected none, attention or blocks")


@contextlib.contextmanager
def _replaying(moes: list[MoE]):
    for m in moes:
        m.recomputing = True
    try:
        yield
    finally:
        for m in moes:
            m.recomputing = False

