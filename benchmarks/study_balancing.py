"""Study: auxiliary-loss-free balancing against a classic auxiliary loss and against no balancing.

    .venv/bin/python benchmarks/study_balancing.py --config configs/tiny.yaml [--seeds 1234 1 2]

Runs the pipeline's pretrain stage three times per seed (through Prefect, each a child run in MLflow) with
pretrain.balancing = aux_free (bias updates, gamma; the report), aux_loss (a sequence-wise auxiliary
loss of weight pretrain.aux_loss_alpha, no bias) and none; data and unchanged variants come from the
cache. Compares expert-load MaxVio (mean over the MoE layers, averaged over the last 30 % of steps) and
the final validation loss, as the balancing paper does (mean and spread over the seeds, which set the
initialisation and the data order); prints a markdown table for the README.
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
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234])
    args = ap.parse_args()
    runs: dict[str, list[tuple[float, float, str]]] = {mode: [] for mode in MODES}
    for seed in args.seeds:
        for mode in MODES:
            result = run_pretrain(args.config, [f"pretrain.balancing={mode}", f"pretrain.seed={seed}",
                                                *args.overrides])
            maxvio = late_maxvio(Path(result["out_dir"]) / "metrics.jsonl")
            runs[mode].append((maxvio, result["metrics"]["final_val_loss"], result["mlflow_run_id"]))
            print(f"seed {seed} {mode:9s} MaxVio {maxvio:.3f}  val loss {runs[mode][-1][1]:.4f}", flush=True)

    def stat(values: list[float], digits: int) -> str:
        spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.{digits}f}{spread}"

    table = [(f"| balancing | MaxVio (last 30 % of steps) | final validation loss | MLflow runs ({len(args.seeds)} "
              "seeds) |"), "|---|---|---|---|"]
    table += [f"| {mode} | {stat([r[0] for r in rs], 3)} | {stat([r[1] for r in rs], 4)} | "
              f"{', '.join(f'`{r[2][:8]}`' for r in rs)} |" for mode, rs in runs.items()]
    write_table("study_balancing", table)


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()
