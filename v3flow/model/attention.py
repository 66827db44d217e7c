"""Multi-head Latent Attention (report §2.1.1, eqs 1-11).

    c_Q  = RMSNorm(W_DQ h)                      [B, T, q_lora_rank]      (wq_a, q_norm)
    q    = W_UQ c_Q -> per head [q_C ; q_R]      [B, T, H, d_h + d_h^R]   (wq_b)
    c_KV = RMSNorm(W_DKV h),  k_R = W_KR h       [B, T, kv_lora_rank], [B, T, d_h^R]   (wkv_a, kv_norm)
    k    = [W_UK c_KV ; RoPE(k_R)], v = W_UV c_KV   (wkv_b; k_R shared by all heads)
    u    = W_O softmax(q k^T * scale) v          (wo)

Two paths, side by side as in DeepSeek's inference code:
- `forward` (training, full sequences): expands keys and values per head and runs fused
  scaled-dot-product attention, causal over the packed sequence (no cross-document mask, as in pretraining);
  with a `mask` (intra-document masking, an option of the training recipe), causal within each document.
- `forward_cached` (decoding): caches only c_KV and RoPE(k_R), d_c + d_h^R values per token, and absorbs
  W_UK into the query and W_UV into the output, so attention runs directly against the latent cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from v3flow.model.args import ModelConfig
from v3flow.model.layers import RMSNorm, upcast
from v3flow.model.rope import apply_rope

# The latent norms' epsilon is fixed in DeepSeek's code and transformers' deepseek_v3 (model.norm_eps is for
# the block norms): a config with another rms_norm_eps must still export to the same logits.
LATENT_NORM_EPS = 1e-6
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def set_attention_kernel(model: nn.Module, kind: str) -> None:
    """kind "memory_efficient": every MLA runs a fused kernel (flash or memory-efficient attention) that never
    materialises the T x T scores, and fails rather than fall back to the math path; "any": PyTorch's choice
    (on CPU, the math path when head sizes differ: faster at short lengths, quadratic memory)."""
    if kind not in ("any", "memory_efficient"):
        raise ValueError(f"attention kernel {kind!r}: expected any or memory_efficient")
    for m in model.modules():
        if isinstance(m, MLA):
            m.kernel = kind


def checkpoint_attention(model: nn.Module) -> None:
    """Selective activation checkpointing: each MLA sublayer is recomputed in the backward pass instead of
    keeping its per-head queries, keys and values (Megatron's selective recompute). The MoE layers are not
    recomputed (their expert-load counters would count twice). Parameter names are unchanged."""
    for m in model.modules():
        if isinstance(m, MLA):
            m.forward = functools.partial(checkpoint, m.forward, use_reentrant=False)


@dataclass
class LatentCache:
    """Per-layer decoding cache: the compressed latent and the shared rotary key only."""

    kv: torch.Tensor  # [B, max_len, kv_lora_rank]   c_KV after kv_norm
    pe: torch.Tensor  # [B, max_len, qk_rope_head_dim]  RoPE(k_R)

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, dtype, device=None) -> LatentCache:
        return cls(torch.zeros(batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device),
                   torch.zeros(batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device))


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, qk, nope, rope, v = cfg.n_heads, cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(cfg.q_lora_rank, h * qk, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, h * qk, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + rope, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, h * (nope + v), bias=False)
        self.wo = nn.Linear(h * v, cfg.dim, bias=False)
        self.scale = cfg.softmax_scale()
        self.kernel = "any"  # set_attention_kernel

    def _queries(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        q = self.wq_b(self.q_norm(self.wq_a(x))) if cfg.q_lora_rank else self.wq(x)
        q = q.view(*x.shape[:2], cfg.n_heads, cfg.qk_head_dim)  # [B, T, H, d_h + d_h^R]
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def _latent(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        kv, k_pe = self.wkv_a(x).split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], dim=-1)
        return self.kv_norm(kv), apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)  # [B,T,d_c], [B,T,d_h^R]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention over the whole sequence, or where `mask` [B, 1, T, T] (True: may attend) allows.
        x: [B, T, dim]; cos/sin: [T, d_h^R / 2]."""
        cfg = self.cfg
        B, T, _ = x.shape
        q_nope, q_pe = self._queries(x, cos, sin)
        kv, k_pe = self._latent(x, cos, sin)
        kv = self.wkv_b(kv).view(B, T, cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, cfg.n_heads, -1)], dim=-1)
        out = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)  # [B, H, T, d_v]
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        causal = {"is_causal": True} if mask is None else {"attn_mask": mask}
        if self.kernel == "any":
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale, **causal)
        # Fused kernels want one head size for q, k and v (MLA has d_h + d_h^R for q, k and d_v for v): zero
        # padding changes no score and no output. The math fallback is excluded, so T x T is never stored.
        qk, dv = q.shape[-1], v.shape[-1]
        if dv < qk:
            v = F.pad(v, (0, qk - dv))
        elif qk < dv:
            q, k = F.pad(q, (0, dv - qk)), F.pad(k, (0, dv - qk))
        with sdpa_kernel(FUSED):
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale, **causal)[..., :dv]

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache,
                       start: int) -> torch.Tensor:
        """Attend from positions start..start+S-1 to the cache, with W_UK / W_UV absorbed. x: [B, S, dim]."""
        cfg = self.cfg
        B, S, _ = x.shape
        end = start + S
        q_nope, q_pe = self._queries(x, cos, sin)
        kv, k_pe = self._latent(x, cos, sin)
        cache.kv[:B, start:end], cache.pe[:B, start:end] = kv, k_pe
        w = self.wkv_b.weight.view(cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        w_uk, w_uv = w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim :]
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # [B, S, H, d_c]
        scores = (torch.einsum("bshc,btc->bsht", q_latent, cache.kv[:B, :end])
                  + torch.einsum("bshr,btr->bsht", q_pe, cache.pe[:B, :end])) * self.scale
        causal = torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
        scores = upcast(scores).masked_fill(~causal[None, :, None, :], float("-inf")).softmax(dim=-1)
        out = torch.einsum("bsht,btc->bshc", scores.type_as(x), cache.kv[:B, :end])
        out = torch.einsum("bshc,hdc->bshd", out, w_uv)  # [B, S, H, d_v]
        return self.wo(out.reshape(B, S, -1))
