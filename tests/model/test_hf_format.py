"""Export to / import from the Hugging Face DeepSeek-V3 format; transformers gives the same logits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from v3flow.model.args import YarnConfig
from v3flow.model.hf_format import export_hf, import_hf
from v3flow.model.transformer import Transformer

transformers.logging.set_verbosity_error()


@pytest.mark.parametrize("yarn", [None, YarnConfig(factor=4.0, original_seq_len=32)])
def test_transformers_loads_export_with_same_logits(tmp_path, cfg, yarn):
    cfg = cfg.model_copy(update={"yarn": yarn})
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    for moe in model.moe_layers():
        moe.gate.bias.normal_(0, 0.05)
    model.eval()
    export_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    tokens = torch.randint(0, cfg.vocab_size, (2, 100))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-5, diff


def test_layout_round_trip_and_mtp_layer(tmp_path, model, cfg):
    export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["num_nextn_predict_layers"] == cfg.mtp_depth
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = f"model.layers.{cfg.n_layers}"
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.0.gate_proj.weight"):
        assert f"{mtp}.{key}" in index
    with safe_open(tmp_path / index[f"{mtp}.eh_proj.weight"], "pt") as f:
        assert f.get_tensor(f"{mtp}.eh_proj.weight").shape == (cfg.dim, 2 * cfg.dim)
    back = import_hf(tmp_path)
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_logits_match_transformers_with_another_norm_eps_and_yarn_past_the_original_length(tmp_path, cfg):
    """rms_norm_eps 1e-5 (transformers fixes the latent norms' eps at 1e-6, so must we), YaRN with a sequence
    four times the original context."""
    cfg = cfg.model_copy(update={"norm_eps": 1e-5, "yarn": YarnConfig(factor=4.0, original_seq_len=32)})
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    model.eval()
    export_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 128))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-5, diff


def test_import_of_yarn_with_mscale_only_matches_transformers(cfg):
    """A config with `mscale` but no `mscale_all_dim`: transformers scales cos/sin by YaRN's default
    0.1 ln s + 1 and leaves the softmax scale alone."""
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from v3flow.model.hf_format import config_from_hf, hf_config

    rope = {"rope_type": "yarn", "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 32,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707}
    c = {**hf_config(cfg), "rope_scaling": rope, "max_position_embeddings": 128}
    ours = config_from_hf(c)
    theirs = DeepseekV3Config(**{k: v for k, v in c.items() if k not in ("architectures", "model_type")})
    _, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](theirs, "cpu")
    assert ours.yarn.rotary_scale() == pytest.approx(attention_factor)  # 1.369, not 1.26
    assert ours.softmax_scale() == pytest.approx(ours.qk_head_dim ** -0.5)
