"""Data-parallel training (gloo on CPU) reaches the loss of one process with the same global batch, started
by torchrun or by `accelerate launch` with the shipped accelerate config; a killed multi-process run resumes
from the full checkpoint its processes gathered. (accelerate's FSDP2 config needs GPUs: refused on CPU.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.stages.pretrain.conftest import losses, write_run
from tests.training import faults
from v3flow.training.checkpoint import latest
from v3flow.training.train import TrainingError, run_loop

ROOT = Path(__file__).parents[3]
# FP32 outside the FP8 GEMMs: where BF16 is fast the trainer would pick it, and BF16 rounds one process's
# accumulated micro-batches and two processes' all-reduced gradients differently; this checks data parallelism.
FP32 = ["pretrain.high_precision=fp32"]
TWO = [*FP32, "pretrain.num_processes=2", "pretrain.micro_batch=2"]


def accelerate(name: str) -> list[str]:
    return ["pretrain.launcher=accelerate", f"pretrain.accelerate_config={ROOT / 'configs/accelerate' / name}"]


def assert_same_curve(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for step, x in a.items():
        assert abs(x["loss"] - b[step]["loss"]) < 2e-3 * x["loss"], (step, x, b[step])
        assert x["batch_sequences"] == b[step]["batch_sequences"], step


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, micro_data):
    one = tmp_path_factory.mktemp("one")
    run_loop(write_run(one, micro_data, FP32).pretrain, one)
    return losses(one)


def test_two_torchrun_processes_match_one(tmp_path, micro_data, one_process):
    run_loop(write_run(tmp_path, micro_data, TWO).pretrain, tmp_path)
    assert_same_curve(one_process, losses(tmp_path))


def test_accelerate_launch_matches_one_process_and_resumes(tmp_path, micro_data, one_process):
    cfg = write_run(tmp_path, micro_data, TWO + accelerate("ddp.yaml"))
    with pytest.raises(TrainingError):
        run_loop(cfg.pretrain, tmp_path, env=faults.env(kill_at=12))  # dies after the step-10 checkpoint ...
    assert latest(tmp_path / "checkpoints").name == "step_000010"
    run_loop(cfg.pretrain, tmp_path)  # ... and the restarted processes resume from it
    assert_same_curve(one_process, losses(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs FSDP2")
def test_fsdp2_config_is_refused_without_gpus(tmp_path, micro_data):
    cfg = write_run(tmp_path, micro_data, TWO + accelerate("fsdp2.yaml"))
    with pytest.raises(TrainingError, match="FSDP needs GPUs"):
        run_loop(cfg.pretrain, tmp_path)
    assert not (tmp_path / "checkpoints").exists()
