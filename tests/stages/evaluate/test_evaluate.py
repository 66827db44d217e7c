"""The evaluation stage on the micro chain: every model in one table, measured on the same validation sequences,
with the long-context and task columns taken from the evaluator that scored each model (by the wiring)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from flows.config import load_config
from flows.executor import run_offline
from flows.recipe import MODEL_STAGES
from tests.conftest import MICRO


@pytest.fixture(scope="module")
def evaluated(micro_workdir):
    cfg = load_config(MICRO, [f"workdir={micro_workdir}"])
    return cfg, run_offline(cfg, ["evaluate"])


def test_every_model_of_the_chain_is_one_row(evaluated):
    _, res = evaluated
    rows = json.loads(Path(res["evaluate"].outputs["models"]).read_text())
    assert [r["model"] for r in rows] == list(MODEL_STAGES)
    for r in rows:
        assert r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-3)
        assert r["maxvio_mean"] >= 0 and 0 <= r["mtp_acceptance_rate"] <= 1
    m = res["evaluate"].metrics
    # the columns of the other evaluators belong to the models they scored
    assert m["extend_phase2.accuracy"] == res["task_eval"].metrics["base.accuracy"]
    assert m["grpo.pass_at_2"] == res["task_eval"].metrics["grpo.pass_at_2"]
    assert m["extend_phase1.long.passkey_rank"] == res["long_eval"].metrics["phase1.passkey_rank"]
    assert "pretrain.accuracy" not in m and "sft.long.passkey_rank" not in m  # not scored: left empty
    batches = json.loads(Path(res["evaluate"].tables["val_batches.json"]).read_text())
    assert {b["model"] for b in batches} == set(MODEL_STAGES)


def test_an_artifact_evaluated_again_gives_the_trainers_own_mtp_acceptance(evaluated, micro_workdir):
    """Evaluating the exported pretrained model with the trainer's prompts reproduces the acceptance the trainer
    measured on its in-memory model at the end of pretraining."""
    cfg, res = evaluated
    prompts = cfg.pretrain.mtp_eval_prompts
    again = run_offline(load_config(MICRO, [f"workdir={micro_workdir}", f"evaluation.mtp_prompts={prompts}",
                                            "evaluation.mtp_new_tokens=64"]), ["evaluate"])["evaluate"]
    assert again.metrics["pretrain.mtp_acceptance_rate"] == pytest.approx(
        res["pretrain"].metrics["final_mtp_acceptance_rate"], abs=0.02)


def test_any_model_folder_joins_the_table(evaluated, micro_workdir):
    """evaluation.models adds a folder from outside the chain (here the pretrained model's Hugging Face export):
    measured the same way, it matches the pretrained model's row."""
    _, res = evaluated
    hf = Path(res["pretrain"].outputs["hf"])
    again = run_offline(load_config(MICRO, [f"workdir={micro_workdir}", f"evaluation.models={{exported: {hf}}}"]),
                        ["evaluate"])["evaluate"]
    assert again.key != res["evaluate"].key
    assert again.metrics["exported.val_loss"] == pytest.approx(res["evaluate"].metrics["pretrain.val_loss"], rel=1e-5)
    assert again.metrics["exported.maxvio_mean"] == pytest.approx(res["evaluate"].metrics["pretrain.maxvio_mean"])
