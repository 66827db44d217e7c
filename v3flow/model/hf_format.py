"""Conversion to and from the Hugging Face DeepSeek-V3 checkpoint format.

An exported folder is what DeepSeek releases: `config.json` (model_type deepseek_v3), safetensors
shards with an index, experts stored one by one (`mlp.experts.{e}.gate_proj.weight`), and the MTP
modules as extra layers `model.layers.{n_layers + k}` holding enorm, hnorm, eh_proj, shared_head.norm,
the block's weights, and copies of the shared embedding and head (`embed_tokens`, `shared_head.head`),
which is how vLLM's DeepSeek MTP drafter reads them. transformers' `DeepseekV3ForCausalLM` loads the
folder directly (it fuses the experts on load and ignores the MTP layer); `import_hf` reads it back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from v3flow.model.args import ModelConfig, YarnConfig
from v3flow.model.transformer import Transformer

ATTN = {"wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj", "wq": "q_proj",
        "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
FFN = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
MTP = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "shared_head.norm"}


def hf_config(cfg: ModelConfig, bos_id: int = 0, eos_id: int = 1, dtype: str = "float32") -> dict:
    rope_scaling = None
    if cfg.yarn:
        y = cfg.yarn
        rope_scaling = {"type": "yarn", "rope_type": "yarn", "factor": y.factor, "beta_fast": y.beta_fast,
                        "beta_slow": y.beta_slow, "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim,
                        "original_max_position_embeddings": y.original_seq_len}
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim, "num_hidden_layers": cfg.n_layers,
        "num_nextn_predict_layers": cfg.mtp_depth, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads, "n_shared_experts": cfg.n_shared_experts,
        "n_routed_experts": cfg.n_routed_experts, "routed_scaling_factor": cfg.route_scale,
        "kv_lora_rank": cfg.kv_lora_rank, "q_lora_rank": cfg.q_lora_rank or None,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "v_head_dim": cfg.v_head_dim, "n_group": cfg.n_expert_groups, "topk_group": cfg.n_limited_groups,
        "num_experts_per_tok": cfg.n_activated_experts, "first_k_dense_replace": cfg.n_dense_layers,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
        "rope_interleave": True, "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": dtype, "use_cache": True,
    }


def config_from_hf(c: dict) -> ModelConfig:
    rs = c.get("rope_scaling") or c.get("rope_parameters") or {}
    yarn = None
    if rs.get("rope_type", rs.get("type")) == "yarn":
        yarn = YarnConfig(factor=rs["factor"], original_seq_len=rs["original_max_position_embeddings"],
                          beta_fast=rs.get("beta_fast", 32), beta_slow=rs.get("beta_slow", 1),
                          mscale=rs.get("mscale") or 0, mscale_all_dim=rs.get("mscale_all_dim") or 0)
    return ModelConfig(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
        n_dense_layers=c["first_k_dense_replace"], inter_dim=c["intermediate_size"],
        moe_inter_dim=c["moe_intermediate_size"], n_heads=c["num_attention_heads"],
        q_lora_rank=c.get("q_lora_rank") or 0, kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"], qk_rope_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"],
        n_routed_experts=c["n_routed_experts"], n_shared_experts=c["n_shared_experts"],
        n_activated_experts=c["num_experts_per_tok"], n_expert_groups=c["n_group"], n_limited_groups=c["topk_group"],
        route_scale=c["routed_scaling_factor"], mtp_depth=c.get("num_nextn_predict_layers", 0),
        rope_theta=c.get("rope_theta", rs.get("rope_theta", 10000.0)), norm_eps=c["rms_norm_eps"],
        max_seq_len=c["max_position_embeddings"], init_std=c.get("initializer_range", 0.006), yarn=yarn,
    )


def _block_to_hf(sd: dict, src: str, dst: str, out: dict) -> None:
    """Keys of one Block under `src` (ours) to `dst` (HF decoder layer)."""
    out[f"{dst}.input_layernorm.weight"] = sd[f"{src}.attn_norm.weight"]
    out[f"{dst}.post_attention_layernorm.weight"] = sd[f"{src}.ffn_norm.weight"]
    for ours, theirs in ATTN.items():
        if f"{src}.attn.{ours}.weight" in sd:
            out[f"{dst}.self_attn.{theirs}.weight"] = sd[f"{src}.attn.{ours}.weight"]
    if f"{src}.ffn.gate.weight" not in sd:  # dense layer
        for ours, theirs in FFN.items():
            out[f"{dst}.mlp.{theirs}.weight"] = sd[f"{src}.ffn.{ours}.weight"]
        return
    out[f"{dst}.mlp.gate.weight"] = sd[f"{src}.ffn.gate.weight"]
    out[f"{dst}.mlp.gate.e_score_correction_bias"] = sd[f"{src}.ffn.gate.bias"]
    for ours, theirs in FFN.items():
        if f"{src}.ffn.shared.{ours}.weight" in sd:
            out[f"{dst}.mlp.shared_experts.{theirs}.weight"] = sd[f"{src}.ffn.shared.{ours}.weight"]
        for e, w in enumerate(sd[f"{src}.ffn.experts.{ours}"].unbind(0)):
            out[f"{dst}.mlp.experts.{e}.{theirs}.weight"] = w


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    cfg, sd = model.cfg, model.state_dict()
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["head.weight"]}
    for i in range(cfg.n_layers):
        _block_to_hf(sd, f"layers.{i}", f"model.layers.{i}", out)
    for k in range(cfg.mtp_depth):
        dst = f"model.layers.{cfg.n_layers + k}"
        _block_to_hf(sd, f"mtp.{k}.block", dst, out)
        for ours, theirs in MTP.items():
            out[f"{dst}.{theirs}.weight"] = sd[f"mtp.{k}.{ours}.weight"]
        out[f"{dst}.embed_tokens.weight"] = sd["embed.weight"]
        out[f"{dst}.shared_head.head.weight"] = sd["head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf_state_dict` (our key names and stacked experts)."""
    ours = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
            "head.weight": hf["lm_head.weight"]}
    blocks = [(f"layers.{i}", f"model.layers.{i}") for i in range(cfg.n_layers)]
    blocks += [(f"mtp.{k}.block", f"model.layers.{cfg.n_layers + k}") for k in range(cfg.mtp_depth)]
    for src, dst in blocks:
        ours[f"{src}.attn_norm.weight"] = hf[f"{dst}.input_layernorm.weight"]
        ours[f"{src}.ffn_norm.weight"] = hf[f"{dst}.post_attention_layernorm.weight"]
        for o, t in ATTN.items():
            if f"{dst}.self_attn.{t}.weight" in hf:
                ours[f"{src}.attn.{o}.weight"] = hf[f"{dst}.self_attn.{t}.weight"]
        if f"{dst}.mlp.gate.weight" not in hf:
            for o, t in FFN.items():
                ours[f"{src}.ffn.{o}.weight"] = hf[f"{dst}.mlp.{t}.weight"]
            continue
        ours[f"{src}.ffn.gate.weight"] = hf[f"{dst}.mlp.gate.weight"]
        ours[f"{src}.ffn.gate.bias"] = hf[f"{dst}.mlp.gate.e_score_correction_bias"].float()
        for o, t in FFN.items():
            if f"{dst}.mlp.shared_experts.{t}.weight" in hf:
                ours[f"{src}.ffn.shared.{o}.weight"] = hf[f"{dst}.mlp.shared_experts.{t}.weight"]
            ours[f"{src}.ffn.experts.{o}"] = torch.stack(
                [hf[f"{dst}.mlp.experts.{e}.{t}.weight"] for e in range(cfg.n_routed_experts)])
    for k in range(cfg.mtp_depth):
        for o, t in MTP.items():
            ours[f"mtp.{k}.{o}.weight"] = hf[f"model.layers.{cfg.n_layers + k}.{t}.weight"]
    return ours


def export_hf(model: Transformer, folder: Path, tokenizer_dir: Path | None = None, dtype=torch.float32,
              shard_bytes: int = 4 << 30, bos_id: int = 0, eos_id: int = 1) -> Path:
    """Write a folder that `DeepseekV3ForCausalLM.from_pretrained` and vLLM load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # clone: the MTP layer's copies of the embedding and head must be separate tensors on disk
    tensors = {k: v.detach().to("cpu", dtype if "e_score" not in k else v.dtype).clone()
               for k, v in to_hf_state_dict(model).items()}
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    dtype_name = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(hf_config(model.cfg, bos_id, eos_id, dtype_name), indent=2))
    # DeepSeek's released sampling settings (R1: temperature 0.6, top-p 0.95). do_sample must be on here: servers
    # such as `transformers serve` copy a request's temperature into this config but never switch sampling on.
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": True, "temperature": 0.6, "top_p": 0.95}))
    if tokenizer_dir:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, folder / f.name)
        tok_cfg = folder / "tokenizer_config.json"
        if tok_cfg.is_file():  # the model's context length, not the tokenizer's default
            tok_cfg.write_text(json.dumps({**json.loads(tok_cfg.read_text()), "model_max_length": model.cfg.max_seq_len},
                                          indent=2, ensure_ascii=False))
    return folder


def import_hf(folder: Path) -> Transformer:
    """Build our model from an HF DeepSeek-V3 folder (ours or DeepSeek's layout, unquantized)."""
    folder = Path(folder)
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    hf: dict[str, torch.Tensor] = {}
    for name in files:
        hf.update(load_file(str(folder / name)))
    model = Transformer(cfg)
    model.load_state_dict(from_hf_state_dict(cfg, hf), strict=True)
    return model
