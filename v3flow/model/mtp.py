"""Multi-token prediction (report §2.2, eqs 21-25).

Module k (k = 1..D) sees, at position i, the previous depth's representation h^{k-1}_i and the embedding
of token t_{i+k}, and predicts t_{i+k+1}:

    h'_i = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]     (eh_proj; enorm, hnorm)
    h^k  = TRM_k(h')                                           (one transformer block, causal)
    P    = softmax(OutHead(RMSNorm_k(h^k)))                    (shared head; shared_head.norm)

The concatenation is [emb ; h], the order of DeepSeek's released weights and of vLLM/SGLang (the paper
writes [h ; emb]), so exported checkpoints drive vLLM's MTP speculative decoding. h^0 is the main model's
final-norm output, which is also what vLLM hands its MTP drafter. The embedding and output head are the
main model's own tensors. Loss: L_MTP = lambda / D * sum_k CE_k, each CE summed over the T - k predicted
positions and divided by T (the report normalises by the input length).
"""

from __future__ import annotations

import torch
from torch import nn

from v3flow.model.args import ModelConfig
from v3flow.model.attention import LatentCache
from v3flow.model.layers import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)  # M_k
        self.block = block  # TRM_k
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def _merge(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos, sin, mask=None) -> torch.Tensor:
        """h_prev, emb_next: [B, T-k, dim] -> h^k: [B, T-k, dim] (before the shared head's norm)."""
        return self.block(self._merge(h_prev, emb_next), cos, sin, mask)

    def forward_cached(self, h_prev, emb_next, cos, sin, cache: LatentCache, start: int) -> torch.Tensor:
        return self.block.forward_cached(self._merge(h_prev, emb_next), cos, sin, cache, start)
