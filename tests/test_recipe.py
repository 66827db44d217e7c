"""configs/deepseek-v3-671b.yaml holds the report's recipe (arXiv 2412.19437), section by section; it stands
alone, and its corpus is a placeholder that must be set before anything runs."""

from __future__ import annotations

import pytest

from flows.config import load_config
from tests.conftest import ROOT
from v3flow.errors import ConfigError
from v3flow.model.args import ModelConfig

V3 = ROOT / "configs" / "deepseek-v3-671b.yaml"


@pytest.fixture(scope="module")
def cfg():
    return load_config(V3, ["data.sources.0.path=/data/corpus"])


def test_the_671b_config_stands_alone():
    assert "base:" not in V3.read_text()


def test_corpus_placeholder_must_be_set():
    with pytest.raises(ConfigError) as err:
        load_config(V3)
    assert "data.sources.0.path [line " in str(err.value) and "--set data.sources.0.path=" in str(err.value)
    small = ROOT / "configs" / "small.yaml"
    with pytest.raises(ConfigError, match="data.sources.0.path"):  # inherits the placeholder
        load_config(small)
    assert load_config(small, ["data.sources.0.path=/data/corpus"]).model.dim == 1536


def test_data_section(cfg):  # §4.1
    d = cfg.data
    assert d.tokenizer.vocab_size == 129_280 and d.packing.seq_len == 4096 and d.packing.fim_rate == 0.1
    assert d.exact_dedup and d.minhash.enabled


def test_model_section(cfg):  # §4.2, config_671B.json
    assert cfg.model == ModelConfig()
    m = cfg.model
    assert (m.dim, m.n_layers, m.n_dense_layers, m.n_heads) == (7168, 61, 3, 128)
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (
        1536, 512, 128, 64, 128)
    assert (m.n_routed_experts, m.n_shared_experts, m.n_activated_experts, m.moe_inter_dim) == (256, 1, 8, 2048)
    assert (m.n_expert_groups, m.n_limited_groups, m.route_scale, m.mtp_depth) == (8, 4, 2.5, 1)
    assert (m.init_std, m.max_seq_len, m.yarn) == (0.006, 4096, None)


def test_pretraining_recipe(cfg):  # §3.3 FP8, §4.2 hyperparameters
    p, s = cfg.pretrain, cfg.pretrain.schedule
    assert (p.precision, p.high_precision, p.moment_dtype) == ("fp8", "bf16", "bfloat16")
    assert (p.betas, p.weight_decay, p.grad_clip, p.balancing) == ((0.9, 0.95), 0.1, 1.0, "aux_free")
    assert s.total_tokens == 14_800_000_000_000
    assert (s.peak_lr, s.warmup_steps) == (2.2e-4, 2000)
    # LR: peak until 10T, cosine to 2.2e-5 by 14.3T, 2.2e-5 for 333B, 7.3e-6 for the last 167B
    assert s.constant_until * 14.8 == pytest.approx(10.0, abs=0.01)
    assert s.decay_until * 14.8 == pytest.approx(14.3, abs=0.001)
    assert s.peak_lr * s.decay_to == pytest.approx(2.2e-5)
    assert (1 - s.tail_from) * 14.8e3 == pytest.approx(167, abs=0.5)
    assert s.peak_lr * s.tail_lr == pytest.approx(7.3e-6, rel=1e-3)
    T = s.total_tokens
    assert s.lr(10_000, 0.5 * T) == 2.2e-4 and s.lr(10_000, 0.98 * T) == pytest.approx(2.2e-5)
    assert s.lr(10_000, 0.999 * T) == pytest.approx(7.3e-6, rel=1e-3)
    # batch 3072 -> 15360 sequences over the first 469B tokens
    assert (s.batch_start, s.batch_end) == (3072, 15360)
    assert s.batch_ramp_until * 14.8e3 == pytest.approx(469, abs=0.5)
    assert s.batch_size(0) == 3072 and s.batch_size(int(0.05 * T)) == 15360
    # MTP lambda 0.3 for the first 10T, 0.1 after; gamma 0.001 until 14.3T, then 0; alpha 1e-4
    assert (s.mtp_lambda(0), s.mtp_lambda(int(0.7 * T))) == (0.3, 0.1)
    assert (s.gamma(0), s.gamma(int(0.97 * T))) == (0.001, 0.0)
    assert s.bias_off_from * 14.8 == pytest.approx(14.3, abs=0.001) and s.balance_alpha == 1e-4


def test_context_extension_recipe(cfg):  # §4.3
    from flows.recipe import STAGES, wiring

    e = cfg.extension
    assert (e.yarn.factor, e.yarn.beta_slow, e.yarn.beta_fast, e.yarn.original_seq_len) == (40, 1, 32, 4096)
    assert e.yarn.attention_mscale() == pytest.approx(0.1 * __import__("math").log(40) + 1)  # sqrt(t)
    assert (e.phase1.seq_len, e.phase1.batch_sequences, e.phase1.steps) == (32_768, 1920, 1000)
    assert (e.phase2.seq_len, e.phase2.batch_sequences, e.phase2.steps) == (131_072, 480, 1000)
    assert e.lr == 7.3e-6 and e.lr == pytest.approx(cfg.pretrain.schedule.peak_lr * cfg.pretrain.schedule.tail_lr,
                                                    rel=1e-3)  # the last pretraining LR, held constant
    for phase, length, batch in (("extend_phase1", 32_768, 1920), ("extend_phase2", 131_072, 480)):
        section = STAGES[phase].section(cfg, wiring(cfg))
        s = section.recipe.schedule
        assert section.model.yarn == e.yarn and section.model.max_seq_len == length
        assert s.batch_size(0) == s.batch_size(s.total_tokens - 1) == batch
        assert s.lr(0, 0) == s.lr(500, s.total_tokens // 2) == s.lr(999, s.total_tokens - 1) == 7.3e-6
        assert s.total_tokens == 1000 * batch * length


def test_post_training_recipe(cfg):  # §5; GRPO values the report leaves out are DeepSeekMath's (marked [DSM])
    p = cfg.posttrain
    assert p.distill.teacher.kind == "openai" and p.distill.teacher.model == "deepseek-ai/DeepSeek-R1"
    assert (p.distill.temperature, p.distill.top_p) == (0.6, 0.95)  # R1's sampling settings
    assert (p.sft.epochs, p.sft.lr, p.sft.min_lr_ratio, p.sft.packing) == (2, 5e-6, 0.2, True)  # 5e-6 -> 1e-6
    assert p.sft.lr == pytest.approx(p.sft.lr_scale * cfg.pretrain.schedule.peak_lr)  # the default: the same
    assert set(p.sft.forms) == {"original", "r1"}  # the report's two forms per instance
    g = p.grpo
    assert (g.num_generations, g.prompts_per_step, g.lr, g.beta) == (64, 16, 1e-6, 0.04)
    assert g.max_completion_length == 32768 >= p.distill.max_response_tokens  # R1's limit: what SFT teaches fits
    assert p.sft.general_share == 0.25  # R1: ~200K non-reasoning beside ~600K reasoning samples
    assert (g.num_iterations, g.loss_type, g.rewards) == (1, "grpo", {"accuracy": 1.0, "format": 0.1})
    assert (p.eval.temperature, p.eval.top_p) == (0.6, 0.95)
    text = (ROOT / "configs" / "deepseek-v3-671b.yaml").read_text()
    assert text.count("[DSM]") >= 5
