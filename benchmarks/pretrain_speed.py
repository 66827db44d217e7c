"""Pretraining throughput: tokens/s and MFU of a config's training step (tiny on CPU; small on a GPU).

    .venv/bin/python benchmarks/pretrain_speed.py --config configs/tiny.yaml [--steps 25]

Uses the config's data stage output (from the content-addressed cache, or prepared first), runs the
trainer at the full batch for --steps steps, and reports the median of the logged 5-step windows after
the first (warm-up). MFU is model FLOPs/s over the measured peak of a 1024^3 fp32 matrix product on this
machine. Results go to MLflow (experiment `v3flow-benchmarks`) and benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

from record import record

from v3flow.config import load_config
from v3flow.stage import StageResult


def data_result(cfg) -> StageResult:
    from v3flow.flows.pipeline import STAGES
    from v3flow.flows.runner import stage_key
    from v3flow.stages.data import run as run_data

    out = cfg.workdir_path() / "data" / stage_key(STAGES["data"], cfg, {})
    return StageResult.load(out) or run_data(cfg.data, out, resolve=cfg.resolve)


def main() -> None:
    from v3flow.stages.pretrain import launch
    from v3flow.stages.pretrain.config import PretrainStageConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    cfg = load_config(args.config)
    data = data_result(cfg)
    s = cfg.pretrain.schedule
    schedule = s.model_copy(update={"total_tokens": args.steps * s.batch_end * cfg.data.packing.seq_len,
                                    "batch_start": s.batch_end, "warmup_steps": 1})
    pretrain = cfg.pretrain.model_copy(update={"schedule": schedule, "log_every": 5, "export_hf": False,
                                               "checkpoint_every": 10**9, "eval_every": 10**9})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "run.json").write_text(json.dumps({
            "model": cfg.model.model_dump(mode="json"), "pretrain": pretrain.model_dump(mode="json"),
            "manifest": data.outputs["manifest"], "tokenizer": data.outputs["tokenizer"], "lineage": {}}))
        launch(PretrainStageConfig(model=cfg.model, pretrain=pretrain), Path(tmp), env={"MLFLOW_RUN_ID": ""})
        windows = [r for r in map(json.loads, (Path(tmp) / "metrics.jsonl").read_text().splitlines())
                   if "tokens_per_s" in r][1:]
    summary = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in windows),
               "mfu": statistics.median(r["mfu"] for r in windows)}
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"{cfg.name}: {summary['tokens_per_s']:,.0f} tokens/s, MFU {summary['mfu']:.1%} "
          f"(batch {s.batch_end} x {cfg.data.packing.seq_len}, {machine})")
    record(f"pretrain_speed_{cfg.name}", summary, {"benchmark": "pretrain_speed", "machine": machine},
           {"config": args.config, "steps": str(args.steps)})

if __name__ == "__main__":
    main()
