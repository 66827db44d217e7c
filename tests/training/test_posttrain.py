"""What post-training does to the router and the MTP module, on the micro architecture: RouterBalance moves the
biases of transformers' routers the way our MoE does (only for passes that train) and lowers MaxVio; `frozen`
holds router weights and biases bit-identical through an optimizer step; the model artifact keeps the trained
biases and, with mtp=refit, a refit MTP module."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flows.config import load_config
from tests.conftest import MICRO
from v3flow.errors import ConfigError
from v3flow.model.hf_format import export_hf, hf_config
from v3flow.model.transformer import Transformer
from v3flow.training import artifact, posttrain
from v3flow.training.posttrain_recipe import RouterAndMtp

SKEW = 1.0  # added to the bias of experts 0 and 1: every token picks them (affinities are in (0, 1))


@pytest.fixture(scope="module")
def cfg():
    return load_config(MICRO).model


def skewed_policy(cfg):
    """transformers' DeepseekV3ForCausalLM of the micro architecture whose routers send every token to experts 0, 1."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_config(cfg)))
    for router in posttrain.hf_routers(model):
        router.e_score_correction_bias[:2] += SKEW
    return model


def train_steps(model, balance, steps: int, tmp_path) -> list[dict]:
    """`steps` optimizer steps of transformers' Trainer on random tokens with `balance`; returns the logs."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Keep(TrainerCallback):
        def __init__(self):
            self.logs: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(10, 1000, (8, 24), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True)
    keep = Keep()
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[balance, keep]).train()
    return keep.logs


def test_only_training_passes_count_and_padding_does_not(cfg):
    model = skewed_policy(cfg)
    balance = posttrain.RouterBalance(model, "bias_update", 0.01)
    ids = torch.randint(10, 1000, (2, 16))
    model.eval()
    model(ids)
    model.train()
    with torch.no_grad():  # GRPO's rollouts and log-probabilities of the old and reference policies
        model(ids)
    assert all(load.sum() == 0 for load in balance.loads)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, as GRPO's prompts have
    model(ids, attention_mask=mask)
    k = cfg.n_activated_experts
    assert all(load.sum() == int(mask.sum()) * k for load in balance.loads)
    assert all(load[:2].sum() == load.sum() for load in balance.loads)  # the skew: only experts 0 and 1


def test_bias_update_moves_biases_as_our_moe_does_and_lowers_maxvio(cfg, tmp_path):
    model = skewed_policy(cfg)
    before = [r.e_score_correction_bias.clone() for r in posttrain.hf_routers(model)]
    gamma = 0.1
    balance = posttrain.RouterBalance(model, "bias_update", gamma)
    logs = train_steps(model, balance, 1, tmp_path / "one")
    for bias, start in zip((r.e_score_correction_bias for r in balance.routers), before):
        # b_i += gamma * sign(mean load - load_i): experts 0, 1 had every token, the others none
        expected = start + gamma * torch.tensor([-1.0, -1.0] + [1.0] * (cfg.n_routed_experts - 2))
        assert torch.allclose(bias, expected)
    assert logs[0][posttrain.MAXVIO] == pytest.approx(cfg.n_routed_experts / cfg.n_activated_experts - 1)
    assert all(load.sum() == 0 for load in balance.loads)  # the counts restart after each step
    # four more skewed steps close the gap of SKEW = 1.0 (2 x gamma per step); the fifth routes by affinity alone
    logs = train_steps(model, posttrain.RouterBalance(model, "bias_update", gamma), 5, tmp_path / "five")
    vio = [log[posttrain.MAXVIO] for log in logs if posttrain.MAXVIO in log]
    assert vio[:4] == [vio[0]] * 4 and vio[4] < 0.7 * vio[0]


def test_frozen_router_stays_bit_identical_through_a_step(cfg, tmp_path):
    model = skewed_policy(cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    balance = posttrain.RouterBalance(model, "frozen", 0.1)
    logs = train_steps(model, balance, 1, tmp_path)
    after = model.state_dict()
    gate = [k for k in start if ".mlp.gate." in k]
    assert gate and all(torch.equal(start[k], after[k]) for k in gate)
    assert any(not torch.equal(start[k], after[k]) for k in start if k not in gate)  # the rest trained
    assert posttrain.MAXVIO in logs[0]  # frozen still reports the balance


def _source(cfg, folder):
    """A model artifact as a model stage leaves it (our checkpoint, model.json)."""
    torch.manual_seed(1)
    model = Transformer(cfg)
    model.init_weights()
    checkpoints = folder / "checkpoints" / "final"
    checkpoints.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(checkpoints / "model.safetensors"))
    (folder / "run.json").write_text("{}")
    artifact.write_manifest(folder, "extend_phase2", cfg, {}, {}, checkpoint=checkpoints, hf=None)
    return model


def _packed(folder, seq_len: int, pad: int = 0, eos: int = 1):
    """A pack stage's output of counting sequences (t_{i+1} = t_i + 1): what the MTP module can learn."""
    folder.mkdir()
    g = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 64), ("val", 8)):
        rows = (g.integers(10, 900, (n, 1)) + np.arange(seq_len)).astype(np.uint32)
        np.save(folder / f"{split}_00000.npy", rows)
        splits[split] = {"shards": [{"path": f"{split}_00000.npy"}]}
    manifest = folder / "manifest.json"
    special = {"pad": pad, "eos": eos}
    manifest.write_text(json.dumps({"seq_len": seq_len, "special_tokens": special, "splits": splits}))
    return manifest


@pytest.mark.parametrize("mtp", ["carry", "refit"])
def test_the_artifact_keeps_the_trained_biases(cfg, tmp_path, mtp):
    source = _source(cfg, tmp_path / "source")
    trained = Transformer(cfg)
    trained.load_state_dict(source.state_dict())
    with torch.no_grad():
        for moe in trained.moe_layers():
            moe.gate.bias.normal_(0, 0.05)  # what RouterBalance did
        trained.layers[0].attn_norm.weight.mul_(1.5)  # what TRL did
    export_hf(trained, tmp_path / "trained")
    out = tmp_path / "out"
    (out / posttrain.TOKENIZER_DIR).mkdir(parents=True)
    (out / "run.json").write_text("{}")  # the stage's TrlSpec, beside which our checkpoint loader finds the checkpoint
    settings = RouterAndMtp(mtp=mtp, mtp_refit_steps=20, mtp_refit_lr=1e-2, mtp_refit_batch=4, mtp_refit_eval=8)
    packed = _packed(tmp_path / "packed", 33) if mtp == "refit" else None
    posttrain.artifact_from_trained("sft", tmp_path / "source", tmp_path / "trained", out, {}, {}, {}, settings,
                                    seed=0, mtp_data=packed)
    state, src, want = artifact.load_state(out), source.state_dict(), trained.state_dict()
    trunk_biases = [k for k in state if k.endswith("ffn.gate.bias") and not k.startswith("mtp.")]
    assert trunk_biases and all(torch.equal(state[k], want[k]) for k in trunk_biases)
    assert torch.equal(state["layers.0.attn_norm.weight"], want["layers.0.attn_norm.weight"])
    mtp_weights = [k for k in state if k.startswith("mtp.") and not k.endswith("gate.bias")]
    assert all(torch.equal(state[k], src[k]) for k in mtp_weights) == (mtp == "carry")
    manifest = artifact.read_manifest(out)
    assert manifest["router_update"] == {"mode": "bias_update", "gamma": 0.001}
    assert manifest["mtp_refit"]["mode"] == mtp
    if mtp == "refit":
        numbers = manifest["mtp_refit"]
        assert numbers["steps"] == 20 and numbers["held_loss_after"] < numbers["held_loss_before"]
        assert "refit" in manifest["mtp"]
    else:
        assert "unchanged" in manifest["mtp"]


def test_refit_without_sequences_is_refused_before_training(cfg, tmp_path):
    with pytest.raises(ConfigError, match="posttrain.grpo.mtp=carry"):
        posttrain.train("grpo", "unused", {}, tmp_path, None, "", 1, {}, {}, settings=RouterAndMtp(), seed=0,
                        mtp_data=None)
