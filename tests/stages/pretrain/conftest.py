from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.config import load_config
from flows.executor import run_offline
from stages.pretrain import PretrainStageConfig
from tests.conftest import MICRO
from v3flow.training.spec import LoopSpec


@pytest.fixture(scope="session")
def micro_data(micro_workdir):
    """The micro corpus packed for training (the `pack` stage's result)."""
    cfg = load_config(MICRO, [f"workdir={micro_workdir}"])
    return run_offline(cfg, ["pack"])["pack"]


def write_run(run_dir: Path, data, overrides: list[str] = (), export_hf: bool = False,
              init_from: Path | None = None) -> PretrainStageConfig:
    cfg = load_config(MICRO, list(overrides))
    stage = PretrainStageConfig(model=cfg.model, pretrain=cfg.pretrain.model_copy(update={"export_hf": export_hf}))
    run_dir.mkdir(parents=True, exist_ok=True)
    LoopSpec(stage="pretrain", model=stage.model, recipe=stage.pretrain, manifest=data.outputs["manifest"],
             tokenizer=data.outputs["tokenizer"], init_from=str(init_from) if init_from else None).write(run_dir)
    return stage


def losses(run_dir: Path) -> dict[int, dict]:
    """The last record of each step in metrics.jsonl (a resumed run appends the replayed steps)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record
    return out
