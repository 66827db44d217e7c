"""The 671B config's parameter counts and cache sizes; YaRN against transformers' implementation."""

from __future__ import annotations

import pytest
import torch

from flows.config import load_config
from tests.conftest import ROOT
from v3flow.model.args import ModelConfig, YarnConfig
from v3flow.model.params import count_parameters, kv_cache_size
from v3flow.model.rope import inv_frequencies


def test_671b_parameter_counts():
    cfg = load_config(ROOT / "configs" / "deepseek-v3-671b.yaml", require_set=False).model
    assert cfg == ModelConfig()  # the config file and the defaults both hold the report's values
    p = count_parameters(cfg)
    assert p.total / 1e9 == pytest.approx(671.03, abs=0.01)
    assert p.activated / 1e9 == pytest.approx(37.55, abs=0.01)
    assert p.mtp_unique / 1e9 == pytest.approx(11.61, abs=0.01)
    assert p.mtp_with_shared / 1e9 == pytest.approx(13.46, abs=0.01)


def test_mla_cache_is_71x_smaller_than_mha():
    kv = kv_cache_size(ModelConfig())
    assert kv.mla_values_per_layer == 576 and kv.mha_values_per_layer == 40960
    assert kv.bytes_per_token(kv.mla_values_per_layer) == 70_272


def test_yarn_matches_transformers():
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig(yarn=YarnConfig())
    hf = DeepseekV3Config(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                           "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                                           "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
                          qk_rope_head_dim=64, max_position_embeddings=163840)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    assert torch.allclose(inv_frequencies(cfg), inv_freq.float(), rtol=1e-6)
    assert attention_factor == pytest.approx(cfg.yarn.rotary_scale())
    assert cfg.yarn.attention_mscale() == pytest.approx(0.1 * torch.log(torch.tensor(40.0)).item() + 1)
    assert cfg.softmax_scale() == pytest.approx(192 ** -0.5 * 1.368888 ** 2, rel=1e-5)


def test_params_command(capsys):
    from v3flow.cli import main

    assert main(["params", str(ROOT / "configs" / "deepseek-v3-671b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "total 671.026 B" in out and "activated per token 37.552 B" in out and "(71.1x more)" in out
