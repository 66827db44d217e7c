"""Parameter counts and KV-cache sizes of a config, computed without allocating weights (meta device)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from v3flow.model.args import ModelConfig
from v3flow.model.transformer import Transformer


@dataclass(frozen=True)
class ParamCounts:
    total: int  # main model, embedding and head included (the report's 671B)
    activated: int  # per token: all but the unselected routed experts (the report's 37B)
    mtp_unique: int  # the MTP modules' own weights
    mtp_with_shared: int  # plus the shared embedding and head they use
    embedding: int


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    with torch.device("meta"):
        model = Transformer(cfg)
    # weights and persistent buffers (the router biases); not the RoPE tables or the load counters
    sizes = {n: t.numel() for n, t in model.state_dict().items()}
    main = sum(v for n, v in sizes.items() if not n.startswith("mtp."))
    mtp = sum(v for n, v in sizes.items() if n.startswith("mtp."))
    per_expert = 3 * cfg.dim * cfg.moe_inter_dim
    idle = (cfg.n_layers - cfg.n_dense_layers) * per_expert * (cfg.n_routed_experts - cfg.n_activated_experts)
    shared = sizes["embed.weight"] + sizes["head.weight"]
    return ParamCounts(main, main - idle, mtp, mtp + shared, sizes["embed.weight"])


@dataclass(frozen=True)
class KVCacheSize:
    mla_values_per_layer: int  # d_c + d_h^R: the latent and the shared rotary key
    mha_values_per_layer: int  # n_h * (d_h + d_h^R + d_v): full keys and values of the same shape
    layers: int

    def bytes_per_token(self, values: int, bytes_per_value: int = 2) -> int:
        return values * self.layers * bytes_per_value


def kv_cache_size(cfg: ModelConfig) -> KVCacheSize:
    return KVCacheSize(cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                       cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim), cfg.n_layers)


def _n(count: int) -> str:
    return f"{count / 1e9:.3f} B" if count >= 1e9 else f"{count / 1e6:.3f} M"


def report(cfg: ModelConfig) -> str:
    p, kv = count_parameters(cfg), kv_cache_size(cfg)
    mla, mha = kv.bytes_per_token(kv.mla_values_per_layer), kv.bytes_per_token(kv.mha_values_per_layer)
    return "\n".join([
        f"parameters (main model)   total {_n(p.total)}   activated per token {_n(p.activated)}",
        f"MTP modules               unique {_n(p.mtp_unique)}   with shared embedding + head {_n(p.mtp_with_shared)}",
        (f"KV cache per token (BF16) MLA {kv.mla_values_per_layer} values/layer = {mla:,} B over {kv.layers} layers;"
         f" MHA of the same shape {kv.mha_values_per_layer} values/layer = {mha:,} B ({mha / mla:.1f}x more)"),
    ])
