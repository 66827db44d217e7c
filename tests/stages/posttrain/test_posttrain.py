"""Post-training stages on the micro config: distillation keeps both forms and every rejection with its reason,
SFT and GRPO write the standard model artifact (router biases updated, MTP module refit, HF logits parity), packed SFT
samples never see each other, GRPO logs its curves, the evaluation scores every arm, and a killed SFT or GRPO run
resumes from its checkpoint to the same numbers as an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from flows.config import load_config
from flows.executor import run_offline, stage_key
from flows.recipe import STAGES, wiring
from tests.conftest import MICRO, ROOT
from v3flow.training import artifact, posttrain
from v3flow.training import launch as training


@pytest.fixture(scope="module")
def chain(micro_workdir):
    cfg = load_config(MICRO, [f"workdir={micro_workdir}"])
    return cfg, run_offline(cfg, ["task_eval"])


def test_distillation_keeps_both_forms_and_every_rejection(chain):
    cfg, res = chain
    samples = pd.read_parquet(res["distill"].outputs["samples"])
    d = cfg.posttrain.distill
    assert len(samples) == d.problems * d.samples_per_problem
    assert set(samples["reason"]) > {"accepted"} and samples.loc[samples.reason == "accepted", "correct"].all()
    sft = pd.read_parquet(res["distill"].outputs["sft"])
    assert set(sft["form"]) == {"original", "r1"}
    r1 = sft[sft.form == "r1"]
    assert (r1.groupby("problem_id").size() <= d.keep_per_problem).all()
    assert all(p[0]["role"] == "system" for p in r1["prompt"]) and all(len(p) == 1 for p in sft[sft.form == "original"]
                                                                         ["prompt"])
    metrics = res["distill"].metrics
    assert metrics["acceptance_rate"] == pytest.approx((samples.reason == "accepted").mean())


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_post_training_writes_the_standard_model_artifact(chain, stage):
    cfg, res = chain
    out, source = Path(res[stage].outputs["model"]), Path(res[STAGES[stage].inputs["model"]].outputs["model"])
    manifest = artifact.read_manifest(out)
    assert manifest["stage"] == stage and manifest["router_update"]["mode"] == "bias_update"
    if stage == "sft":  # general data beside the distilled samples, at the configured share of the tokens
        m = res["sft"].metrics
        assert m["general_rows"] > 0 and m["general_token_share"] == pytest.approx(
            cfg.posttrain.sft.general_share, abs=0.05)
    # its learning rate is a multiple of the pretraining peak that made the model, which every artifact carries
    peak = cfg.pretrain.schedule.peak_lr
    assert manifest["pretraining_peak_lr"] == artifact.pretraining_peak_lr(source) == peak
    assert manifest["learning_rate"] == pytest.approx(getattr(cfg.posttrain, stage).lr_scale * peak)
    if stage == "sft":  # what the trainer ran: warmup to the peak, then cosine down
        logged = [r["learning_rate"] for r in posttrain.read_metrics(out) if "learning_rate" in r]
        assert 0.5 * manifest["learning_rate"] < max(logged) <= manifest["learning_rate"] * (1 + 1e-6)
    refit = manifest["mtp_refit"]
    assert refit["mode"] == "refit" and refit["held_loss_after"] < refit["held_loss_before"]
    before, after = artifact.load_state(source), artifact.load_state(out)
    biases = [k for k in before if k.endswith("gate.bias")]
    assert all(not torch.equal(before[k], after[k]) for k in biases if k.startswith("layers."))  # bias update
    assert all(torch.equal(before[k], after[k]) for k in biases if k.startswith("mtp."))  # none in the refit
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("mtp."))  # refit
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("layers."))  # it trained
    logged = posttrain.read_metrics(out)
    assert all(posttrain.MAXVIO in r for r in logged if "loss" in r)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / manifest["hf"], dtype=torch.float32).eval()
    ours = artifact.load_model(out).eval()
    tokens = torch.randint(10, 500, (2, 40))
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, ours(tokens), atol=1e-4)


def test_sft_general_rows_attend_as_the_input_model_was_pretrained(chain):
    """A model pretrained with pretrain.document_mask gets one document a general row (each SFT sample attends only
    to itself); otherwise a row spans documents as that model's pretraining rows did. Every token is kept."""
    from stages.sft import pieces

    eos, seq = 9, np.array([1, 2, 9, 3, 4, 5, 6, 7, 9, 8, 9, 4])
    assert [p.tolist() for p in pieces(seq, 4)] == [[1, 2, 9, 3], [4, 5, 6, 7], [9, 8, 9, 4]]
    assert [p.tolist() for p in pieces(seq, 4, eos)] == [[1, 2, 9], [3, 4, 5, 6], [7, 9], [8, 9], [4]]
    cfg, res = chain  # micro pretrains without the mask: its SFT rows span documents
    assert not artifact.document_masked(Path(res["extend_phase2"].outputs["model"]))
    assert artifact.read_manifest(Path(res["sft"].outputs["model"]))["document_mask"] is False


def test_packed_samples_do_not_see_each_other(chain):
    """SFT packs samples with their own position ids and no attention mask: transformers builds a block-diagonal
    causal mask from them, so a packed sample's logits are its logits alone (the report's sample masking). That
    holds only without a KV cache, which the SFT policy switches off; with one, the second sample sees the first."""
    _, res = chain
    a, b = torch.randint(10, 500, (1, 17)), torch.randint(10, 500, (1, 23))
    packed, positions = torch.cat([a, b], dim=1), torch.cat([torch.arange(17), torch.arange(23)])[None]
    for is_packed in (True, False):
        hf = posttrain.load_policy(res["sft"].outputs["hf"], packed=is_packed).eval()
        with torch.no_grad():
            together = hf(input_ids=packed, position_ids=positions).logits
            alone = torch.cat([hf(input_ids=a).logits, hf(input_ids=b).logits], dim=1)
        assert torch.allclose(together, alone, atol=1e-4) == is_packed


def test_grpo_logs_its_curves_and_the_evaluation_scores_every_arm(chain):
    cfg, res = chain
    steps = posttrain.read_metrics(Path(res["grpo"].out_dir))
    assert [r["step"] for r in steps] == list(range(1, cfg.posttrain.grpo.steps + 1))
    for key in ("reward", "reward_std", "rewards/accuracy_reward/mean", "completions/mean_length",
                "completions/clipped_ratio", "frac_reward_zero_std", "kl"):
        assert all(key in r for r in steps), key
    rows = json.loads(Path(res["task_eval"].outputs["accuracy"]).read_text())
    # the base model in its own (few-shot) format and in the R1 form; post-trained models in the R1 form
    assert [(r["arm"], r["form"]) for r in rows] == [("base", "few_shot"), ("base", "r1"), ("sft", "r1"), ("grpo", "r1")]
    assert all({"accuracy", "accuracy_stderr", "accuracy_harder"} <= set(r) for r in rows)
    # pass@k in each arm's own format; the other form beside it is decoded greedily only
    assert [{"pass_at_1", "pass_at_2"} <= set(r) for r in rows] == [True, False, True, True]
    samples = json.loads(Path(res["task_eval"].tables["samples.json"]).read_text())
    e = cfg.posttrain.eval
    per_arm = e.problems + e.harder_problems  # the trained 1-digit ones and the harder 2-digit ones (fewer)
    assert len(samples) == 3 * per_arm and sum(s["trained"] for s in samples) == 3 * e.problems
    assert {s["form"] for s in samples if s["arm"] == "base"} == {"few_shot"}
    m = res["task_eval"].metrics
    assert m["base.problems"] == cfg.posttrain.eval.problems and "base.r1.accuracy" in m
    assert "sft.gain_over_base_stderr" in m and any(k.endswith("_carries") for k in m)
    assert {"grpo.sampled_gain_over_sft", "grpo.sampled_gain_over_sft_stderr"} <= set(m)  # R1's pass@1, paired


def test_grpo_prompts_are_the_ones_the_sft_model_sometimes_solves(chain, tmp_path):
    """The selection samples every candidate G times with the SFT model and keeps exactly the problems with a pass
    rate strictly between 0 and 1; with none it stops with the reason. An overlong penalty that would start
    before the model's right answers is refused."""
    from stages import grpo
    from v3flow.errors import ConfigError
    from v3flow.tasks import build

    cfg, res = chain
    g = cfg.posttrain.grpo.model_copy(update={"select_prompts": 12, "num_generations": 4, "temperature": 1.0})
    task, sft = build(cfg.posttrain.task), Path(res["sft"].outputs["model"])
    try:
        kept, stats = grpo.select(g, task, task.problems("train"), sft, tmp_path)
    except ConfigError as e:
        assert "strictly between 0 and 1" in str(e)
        kept, stats = [], None
    scored = json.loads((tmp_path / "selection.json").read_text())
    assert len(scored) == 12 and [p.id for p in kept] == [r["id"] for r in scored if 0 < r["samples_correct"] < 4]
    if stats:
        assert stats["selection.kept"] == len(kept) and 0 < stats["selection.pass_rate"] < 1
    right = [r["tokens"] for r in scored if r["correct"]]
    early = g.model_copy(update={"overlong_buffer": g.max_completion_length - 1})  # the penalty from token 1 on
    if right:
        with pytest.raises(ConfigError, match="would punish right answers"):
            grpo.select(early, task, task.problems("train"), sft, tmp_path)


def _out_dir(cfg, stage: str) -> Path:
    inputs = {role: run_offline(cfg, [up])[up] for role, up in wiring(cfg).inputs[stage].items()}
    return cfg.workdir_path() / stage / stage_key(STAGES[stage], cfg, inputs)


@pytest.mark.parametrize("stage, overrides, keys", [
    ("sft", ["posttrain.sft.epochs=4"], ("loss", "grad_norm", "mean_token_accuracy")),
    ("grpo", ["posttrain.grpo.steps=5", "posttrain.grpo.save_steps=2"], ("reward", "completions/mean_length", "loss")),
])
def test_a_killed_run_resumes_to_the_same_numbers(chain, tmp_path, capsys, stage, overrides, keys):
    """SIGKILL after the step-2 checkpoint, then the stage again: it resumes there (optimizer, scheduler, RNG,
    data position, the precision chosen at the start, and the experts: transformers' own resume misses them)
    and every later step matches a run that was never interrupted."""
    cfg = load_config(MICRO, [f"workdir={chain[0].workdir}", *overrides])
    out_dir = _out_dir(cfg, stage)
    script = (f"from flows.config import load_config\nfrom flows.executor import run_offline\n"
              f"if __name__ == '__main__':\n    run_offline(load_config({str(MICRO)!r}, "
              f"{[f'workdir={cfg.workdir}', *overrides]!r}), [{stage!r}])\n")
    (tmp_path / "run.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py")], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out_dir / posttrain.TRAINER_DIR / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.is_file() and not (out_dir / "result.json").exists()
    reference = tmp_path / "reference"  # the same run, never interrupted
    reference.mkdir()
    for name in ("run.json", posttrain.TOKENIZER_DIR):
        copy = shutil.copytree if (out_dir / name).is_dir() else shutil.copy
        copy(out_dir / name, reference / name)
    training.launch(f"stages.{stage}.trainer", reference)
    capsys.readouterr()
    run_offline(cfg, [stage])
    assert f"[{stage}] resuming from {out_dir / posttrain.TRAINER_DIR / 'checkpoint-2'}" in capsys.readouterr().out
    resumed, uninterrupted = posttrain.read_metrics(out_dir), posttrain.read_metrics(reference)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
    for a, b in zip(resumed, uninterrupted, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    final = {k: v for k, v in load_file(str(out_dir / "checkpoints" / "final" / "model.safetensors")).items()}
    assert final  # the resumed run wrote its model artifact


def test_a_learning_rate_is_absolute_or_relative_to_the_input_models_pretraining(tmp_path):
    from stages.grpo.config import GrpoConfig
    from stages.sft.config import SftConfig
    from v3flow.errors import ConfigError

    made_here, from_outside = tmp_path / "ours", tmp_path / "hf"
    made_here.mkdir(), from_outside.mkdir()
    (made_here / artifact.MODEL_FILE).write_text(json.dumps({"pretraining_peak_lr": 2.2e-4}))
    assert posttrain.peak_lr("sft", SftConfig(), made_here)[0] == pytest.approx(5e-6)  # the report's, by default
    assert posttrain.peak_lr("grpo", GrpoConfig(), made_here)[0] == pytest.approx(1e-6)
    assert posttrain.peak_lr("sft", SftConfig(lr_scale=0.5), made_here)[0] == pytest.approx(1.1e-4)
    assert posttrain.peak_lr("sft", SftConfig(lr=3e-5), from_outside) == (3e-5, "posttrain.sft.lr")
    with pytest.raises(ConfigError, match=r"posttrain\.grpo\.lr is unset.*set posttrain\.grpo\.lr"):
        posttrain.peak_lr("grpo", GrpoConfig(), from_outside)
