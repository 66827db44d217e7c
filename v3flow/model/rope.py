"""Rotary position embedding of the decoupled dims q^R, k^R, with YaRN (report §2.1.1 and §4.3).

Layout: DeepSeek rotates adjacent pairs (x0, x1), (x2, x3), ...; exported checkpoints say so with
`rope_interleave: true`, which transformers and vLLM honour.
"""

from __future__ import annotations

import math

import torch

from v3flow.model.args import ModelConfig
from v3flow.model.layers import upcast


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """theta_i = base^(-2i/d); with YaRN, low frequencies are interpolated by 1/s and high ones kept."""
    dim = cfg.qk_rope_head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    y = cfg.yarn
    if y is None:
        return freqs.float()
    # dims whose wavelength 2*pi/theta_i fits between beta_fast and beta_slow rotations in L are blended
    low, high = (_correction_dim(b, dim, cfg.rope_theta, y.original_seq_len) for b in (y.beta_fast, y.beta_slow))
    low, high = max(math.floor(low), 0), min(math.ceil(high), dim - 1)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3), 0, 1)
    extrapolate = 1 - ramp  # 1 for high-frequency dims: keep theta_i
    return (freqs / y.factor * (1 - extrapolate) + freqs * extrapolate).float()


def _correction_dim(rotations: float, dim: int, base: float, length: int) -> float:
    """The rotary dim index whose frequency makes `rotations` full turns over `length` positions."""
    return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_tables(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [seq_len, qk_rope_head_dim // 2], in fp32."""
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(t, inv_frequencies(cfg).to(device))
    scale = cfg.yarn.rotary_scale() if cfg.yarn else 1.0
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim. x: [batch, seq, heads, rope_dim]; cos/sin: [seq, rope_dim/2]."""
    xf = upcast(x)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    cos, sin = cos[:, None, :].to(xf.dtype), sin[:, None, :].to(xf.dtype)
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return out.type_as(x)
