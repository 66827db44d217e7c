"""A training stage can start from an existing model: our checkpoint or a Hugging Face deepseek_v3 folder
(weights and router biases; optimizer and schedule fresh). A model of another architecture is refused."""

from __future__ import annotations

import json

import pytest
import torch

from flows.config import load_config
from tests.conftest import MICRO
from tests.stages.pretrain.conftest import losses, write_run
from v3flow.training import artifact, checkpoint
from v3flow.training.train import run_loop


@pytest.fixture(scope="module")
def trained(tmp_path_factory, micro_data):
    run = tmp_path_factory.mktemp("first")
    run_loop(write_run(run, micro_data, export_hf=True).pretrain, run)
    return run


def test_the_hf_folder_and_the_checkpoint_hold_the_same_model(trained):
    ours = artifact.load_state(checkpoint.latest(trained / "checkpoints"))
    via_hf = artifact.load_state(trained / "hf")
    assert ours.keys() == via_hf.keys()
    assert all(torch.equal(ours[k], via_hf[k]) for k in ours)
    assert any(k.endswith("ffn.gate.bias") and ours[k].abs().sum() > 0 for k in ours)  # trained router biases
    tok_cfg = json.loads((trained / "hf" / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == load_config(MICRO).model.max_seq_len
    assert json.loads((trained / "hf" / "generation_config.json").read_text())["eos_token_id"] == 1


@pytest.mark.parametrize("source", ["hf", "checkpoint"])
def test_training_continues_from_an_upstream_model(tmp_path, micro_data, trained, source):
    init = trained / "hf" if source == "hf" else checkpoint.latest(trained / "checkpoints")
    run = tmp_path / "second"
    run_loop(write_run(run, micro_data, ["pretrain.schedule.total_tokens=2048"], init_from=init).pretrain, run)
    first, second = losses(trained), losses(run)
    start, end, resumed = first[min(first)]["loss"], first[max(first)]["loss"], second[min(second)]["loss"]
    # a fresh init would start near `start`; the loaded model starts near where the first run ended (another
    # batch: within half of what the first run learned)
    assert start - end > 0.5 and abs(resumed - end) < (start - end) / 2, (start, end, resumed)
    assert min(second) == 1  # a fresh schedule: step counting starts over


def test_a_model_of_another_architecture_is_refused(trained):
    other = load_config(MICRO, ["model.dim=96"]).model
    with pytest.raises(ValueError, match="pretrain.init_from=.*model.dim: 64 there, 96 here"):
        artifact.check_compatible(trained / "hf", other, "pretrain.init_from")
    artifact.check_compatible(trained / "hf", load_config(MICRO, ["model.max_seq_len=512"]).model, "k")  # allowed
