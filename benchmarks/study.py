"""What the studies share: a pretraining run through the pipeline with some config overrides, and the
markdown table they print for the README (also written to benchmarks/results/NAME.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_pretrain(config: str, overrides: list[str]) -> dict:
    """`v3flow run CONFIG --stages pretrain` (data and unchanged variants come from the cache); returns
    the pretrain stage's result: out_dir, metrics, mlflow_run_id."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    cmd = [sys.executable, "-m", "v3flow.cli", "run", config, "--stages", "pretrain", "--json", *sets]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])["pretrain"]


def write_table(name: str, table: list[str]) -> None:
    print("\n".join(table))
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path(f"benchmarks/results/{name}.md").write_text("\n".join(table) + "\n")
