"""Model hyperparameters. Defaults are the DeepSeek-V3 671B release (report §4.2, config_671B.json).

Field names follow DeepSeek's inference `ModelArgs`; `hf_format.py` maps them to transformers'
`DeepseekV3Config` names (given in each description).
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from v3flow.section import Section


class YarnConfig(Section):
    """YaRN RoPE scaling of the decoupled rotary dims (report §4.3; YaRN paper eqs 17-22)."""

    factor: float = Field(40.0, gt=1, description="s: context multiplier.")
    original_seq_len: int = Field(4096, gt=0, description="L: pretraining context (original_max_position_embeddings).")
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = Field(1.0, ge=0, description="0: not set (a Hugging Face config without the key)")
    mscale_all_dim: float = Field(1.0, ge=0, description="0: not set")

    def _m(self, mscale: float) -> float:
        return 0.1 * mscale * math.log(self.factor) + 1.0

    def attention_mscale(self) -> float:
        """m = 0.1 * mscale_all_dim * ln(s) + 1 (1 when mscale_all_dim is not set); the softmax scale is
        multiplied by m^2, as DeepSeek's code and transformers' deepseek_v3 do."""
        return self._m(self.mscale_all_dim) if self.mscale_all_dim else 1.0

    def rotary_scale(self) -> float:
        """Factor on cos/sin: m(mscale) / m(mscale_all_dim) when both are set (1 in DeepSeek-V3's config), else
        YaRN's default m(1) = 0.1 ln(s) + 1 (transformers' rule for an incomplete config)."""
        if self.mscale and self.mscale_all_dim:
            return self._m(self.mscale) / self._m(self.mscale_all_dim)
        return self._m(1.0)


class ModelConfig(Section):
    """DeepSeek-V3 architecture. Every field's default is the 671B model's value."""

    vocab_size: int = Field(129280, gt=0, description="vocab_size")
    dim: int = Field(7168, gt=0, description="d (hidden_size)")
    n_layers: int = Field(61, gt=0, description="L (num_hidden_layers)")
    n_dense_layers: int = Field(3, ge=0, description="first layers with a dense FFN (first_k_dense_replace)")
    inter_dim: int = Field(18432, gt=0, description="dense FFN width (intermediate_size)")
    moe_inter_dim: int = Field(2048, gt=0, description="expert FFN width (moe_intermediate_size)")
    n_heads: int = Field(128, gt=0, description="n_h (num_attention_heads)")
    q_lora_rank: int = Field(1536, ge=0, description="d_c' query compression; 0: no compression (q_lora_rank)")
    kv_lora_rank: int = Field(512, gt=0, description="d_c joint KV compression (kv_lora_rank)")
    qk_nope_head_dim: int = Field(128, gt=0, description="d_h (qk_nope_head_dim)")
    qk_rope_head_dim: int = Field(64, gt=0, description="d_h^R decoupled RoPE dims (qk_rope_head_dim)")
    v_head_dim: int = Field(128, gt=0, description="v_head_dim")
    n_routed_experts: int = Field(256, gt=0, description="N_r (n_routed_experts)")
    n_shared_experts: int = Field(1, ge=0, description="N_s (n_shared_experts)")
    n_activated_experts: int = Field(8, gt=0, description="K_r (num_experts_per_tok)")
    n_expert_groups: int = Field(8, gt=0, description="routing groups, ~ nodes (n_group)")
    n_limited_groups: int = Field(4, gt=0, description="M: groups a token may use (topk_group)")
    route_scale: float = Field(2.5, gt=0, description="routed_scaling_factor")
    mtp_depth: int = Field(1, ge=0, description="D: MTP modules (num_nextn_predict_layers)")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-6, gt=0, description="rms_norm_eps")
    max_seq_len: int = Field(4096, gt=0, description="longest sequence the rotary tables cover")
    init_std: float = Field(0.006, gt=0, description="N(0, std^2) init of all weights (report §4.2)")
    yarn: YarnConfig | None = Field(None, description="YaRN scaling; set by context extension (report §4.3)")

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.n_routed_experts % self.n_expert_groups:
            raise ValueError(f"n_expert_groups={self.n_expert_groups} must divide "
                             f"n_routed_experts={self.n_routed_experts}")
        if self.n_limited_groups > self.n_expert_groups:
            raise ValueError(f"n_limited_groups={self.n_limited_groups} exceeds n_expert_groups={self.n_expert_groups}")
        per_group = self.n_routed_experts // self.n_expert_groups
        if self.n_activated_experts > self.n_limited_groups * per_group:
            raise ValueError(f"n_activated_experts={self.n_activated_experts} exceeds the "
                             f"{self.n_limited_groups * per_group} experts of n_limited_groups groups")
        if per_group < 2 and self.n_expert_groups > 1:
            raise ValueError("each routing group needs at least 2 experts (group score = sum of its top-2)")
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"n_dense_layers={self.n_dense_layers} exceeds n_layers={self.n_layers}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (rotary pairs)")
        return self

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R), times YaRN's m^2 when YaRN is on (as DeepSeek's code and transformers do)."""
        scale = self.qk_head_dim ** -0.5
        return scale * self.yarn.attention_mscale() ** 2 if self.yarn else scale
