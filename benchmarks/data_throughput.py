"""Data-stage throughput: MB/s of input text on the default corpus, and the share of time in each step.

    .venv/bin/python benchmarks/data_throughput.py --config configs/tiny.yaml [--repeats 3]

Runs the stage function directly (no Prefect), each repeat into a fresh folder so nothing is cached,
prints a markdown table for the README and logs the figures to MLflow (experiment `v3flow-benchmarks`;
the local server is started when no MLFLOW_TRACKING_URI is set).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

from record import record

from flows.config import load_config
from stages.data import run
from v3flow.section import section_hash

STEPS = ["read_filter", "exact_dedup", "minhash_dedup", "train_tokenizer", "tokenize", "pack"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)

    runs = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            result = run(cfg.data, Path(tmp) / "data", resolve=cfg.resolve)
        runs.append(result.metrics)
        print(f"repeat {i + 1}: {result.metrics['throughput_mb_s']:.3f} MB/s", flush=True)

    total = statistics.median(r["time_total_s"] for r in runs)
    summary = {
        "input_mb": runs[0]["input_bytes"] / 1e6,
        "docs_read": runs[0]["docs_read"],
        "tokens": runs[0]["tokens"],
        "time_total_s": total,
        "throughput_mb_s": statistics.median(r["throughput_mb_s"] for r in runs),
        **{f"share_{s}": statistics.median(r.get(f"time_{s}_s", 0) for r in runs) / total for s in STEPS},
    }
    machine = f"{platform.machine()}, {os.cpu_count()} cores, workers={cfg.data.executor.workers}"
    print(table(summary, cfg.name, machine))

    record(f"data_throughput_{cfg.name}", summary, {"benchmark": "data_throughput", "machine": machine,
                                                   "v3flow.config_hash": section_hash(cfg.data)},
           {"config": args.config, "repeats": str(args.repeats)})

def table(s: dict, name: str, machine: str) -> str:
    rows = ["| step | share of time |", "|---|---|"]
    rows += [f"| {step} | {s[f'share_{step}']:.1%} |" for step in STEPS]
    return (f"\n`{name}`: {s['input_mb']:.1f} MB of text, {s['docs_read']:.0f} documents, {s['tokens']:,.0f} tokens "
            f"in {s['time_total_s']:.1f} s = **{s['throughput_mb_s']:.2f} MB/s** ({machine})\n\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
