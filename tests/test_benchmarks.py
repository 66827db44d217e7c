"""`make bench`'s scripts run to the end and land their numbers in MLflow (model_speed.py once crashed after its
table, on a metric name MLflow refuses). Run on the micro config with few steps: this checks that they work,
not how fast anything is."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import MICRO, ROOT

pytestmark = pytest.mark.e2e

SCRIPTS = {
    "model_speed": ["--batch", "2", "--seq", "32", "--steps", "2"],
    "data_throughput": ["--set", "data.sources.0.include=[json/*,email/*,http/*]",  # a third of micro's corpus
                        "--set", "data.minhash.enabled=false"],
    "pretrain_speed": ["--steps", "10"],
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_runs_and_records(servers, tmp_path, micro_workdir, name):
    env = {**servers, "V3FLOW_BENCH_RESULTS": str(tmp_path / "results")}
    args = [*SCRIPTS[name], "--config", str(MICRO)]
    if name == "pretrain_speed":
        args += ["--set", f"workdir={micro_workdir}"]  # the stage tests' packed data, reused from the cache
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    run_id = proc.stdout.split("logged to MLflow run ")[1].split()[0]
    metrics = MlflowClient(servers["MLFLOW_TRACKING_URI"]).get_run(run_id).data.metrics
    numbers = {k for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    assert numbers and len(metrics) == len(numbers)
