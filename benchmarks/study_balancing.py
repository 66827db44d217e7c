"""Study: auxiliary-loss-free balancing against a classic auxiliary loss and against no balancing.

    .venv/bin/python benchmarks/study_balancing.py --config configs/tiny.yaml

Runs the pipeline's pretrain stage three times (through Prefect, each a child run in MLflow) with
pretrain.balancing = aux_free (bias updates, gamma; the report), aux_loss (a sequence-wise auxiliary
loss of weight pretrain.aux_loss_alpha, no bias) and none; data and unchanged variants come from the
cache. Compares expert-load MaxVio (mean over the MoE layers, averaged over the last 30 % of steps) and
the final validation loss, as the balancing paper does; prints a markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from study import run_pretrain, write_table

MODES = ("aux_free", "aux_loss", "none")


def late_maxvio(metrics_file: Path, share: float = 0.3) -> float:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    rows = [r for r in {r["step"]: r for r in rows}.values() if "maxvio_mean" in r]
    tail = rows[int(len(rows) * (1 - share)):]
    return statistics.mean(r["maxvio_mean"] for r in tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    rows = []
    for mode in MODES:
        result = run_pretrain(args.config, [f"pretrain.balancing={mode}", *args.overrides])
        out = Path(result["out_dir"])
        m = result["metrics"]
        rows.append((mode, late_maxvio(out / "metrics.jsonl"), m["final_val_loss"], result["mlflow_run_id"]))
        print(f"{mode:9s} MaxVio {rows[-1][1]:.3f}  val loss {rows[-1][2]:.4f}", flush=True)
    table = ["| balancing | MaxVio (last 30 % of steps) | final validation loss | MLflow run |", "|---|---|---|---|"]
    table += [f"| {mode} | {mv:.3f} | {vl:.4f} | `{rid}` |" for mode, mv, vl, rid in rows]
    write_table("study_balancing", table)


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()
