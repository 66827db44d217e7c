"""Pretraining throughput: tokens/s and MFU of a config's training step (tiny on CPU; small on a GPU).

    .venv/bin/python benchmarks/pretrain_speed.py --config configs/tiny.yaml [--steps 25] [--set k=v ...]
    python benchmarks/pretrain_speed.py --config configs/small.yaml --manifest DIR/packed/manifest.json \
        --tokenizer DIR/tokenizer --no-record --out small.json          (on a GPU machine without the servers)

Uses the config's packed data (from the content-addressed cache, or prepared first; or --manifest),
runs the trainer at the full batch for --steps steps, and reports the median of the logged 5-step windows
after the first (warm-up). MFU is model FLOPs/s over the measured peak of a matrix product on the same
device (fp32 1024^3 on CPU, bf16 8192^3 on a GPU). Results go to MLflow (experiment `v3flow-benchmarks`)
and benchmarks/results/ unless --no-record; `benchmarks/record.py NAME FILE` records a --out file later.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

from flows.config import load_config


def data_outputs(cfg, args) -> dict:
    if args.manifest:
        return {"manifest": args.manifest, "tokenizer": args.tokenizer}
    from flows.executor import run_offline

    return run_offline(cfg, ["pack"])["pack"].outputs


def measure(cfg, data: dict, steps: int) -> dict:
    """Train `steps` steps at the full batch; the median tokens/s and MFU of the 5-step windows after the first,
    and the precision the trainer chose."""
    from v3flow.training.spec import LoopSpec
    from v3flow.training.train import run_loop

    s = cfg.pretrain.schedule
    schedule = s.model_copy(update={"total_tokens": steps * s.batch_end * cfg.data.packing.seq_len,
                                    "batch_start": s.batch_end, "warmup_steps": 1})
    pretrain = cfg.pretrain.model_copy(update={"schedule": schedule, "log_every": 5, "export_hf": False,
                                               "checkpoint_every": 10**9, "eval_every": 10**9})
    with tempfile.TemporaryDirectory() as tmp:
        LoopSpec(stage="pretrain", model=cfg.model, recipe=pretrain, manifest=data["manifest"],
                 tokenizer=data["tokenizer"]).write(Path(tmp))
        run_loop(pretrain, Path(tmp), env={"MLFLOW_RUN_ID": ""})
        windows = [r for r in map(json.loads, (Path(tmp) / "metrics.jsonl").read_text().splitlines())
                   if "tokens_per_s" in r][1:]
        chosen = json.loads((Path(tmp) / "run_params.json").read_text())
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in windows),
            "mfu": statistics.median(r["mfu"] for r in windows), "autocast": chosen["precision.autocast"]}


def machine_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--manifest", help="a packed-data manifest.json instead of the config's data stage")
    ap.add_argument("--tokenizer", help="the tokenizer folder that goes with --manifest")
    ap.add_argument("--out", help="also write the result to this JSON file")
    ap.add_argument("--no-record", action="store_true", help="do not log to MLflow")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    summary = measure(cfg, data_outputs(cfg, args), args.steps)
    autocast = summary.pop("autocast")
    machine, precision, s = machine_name(), cfg.pretrain.precision, cfg.pretrain.schedule
    print(f"{cfg.name} ({precision}, {autocast} outside FP8 GEMMs): {summary['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {summary['mfu']:.1%} (batch {s.batch_end} x {cfg.data.packing.seq_len}, {machine})")
    tags = {"benchmark": "pretrain_speed", "machine": machine, "precision": precision, "autocast": autocast}
    params = {"config": args.config, "steps": str(args.steps), "overrides": " ".join(args.set)}
    if args.out:
        Path(args.out).write_text(json.dumps({**tags, **params, **summary}, indent=2))
    if not args.no_record:
        from record import record

        record(f"pretrain_speed_{cfg.name}_{precision}", summary, tags, params)


if __name__ == "__main__":
    main()
