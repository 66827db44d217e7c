"""Where benchmark figures go: a run in MLflow experiment `v3flow-benchmarks` and benchmarks/results/NAME.json
(V3FLOW_BENCH_RESULTS names another folder)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from v3flow import servers, tracking


def record(name: str, summary: dict, tags: dict, params: dict, figures: dict | None = None) -> str:
    """Log `summary` as metrics of a new benchmark run, with `figures` ({file name: matplotlib figure}),
    (the local MLflow server is started when no MLFLOW_TRACKING_URI is set) and write it, with the tags,
    to benchmarks/results/NAME.json."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or servers.start(servers.MLFLOW)
    run_id = tracking.start_run(uri, "v3flow-benchmarks", name, tags, params)
    tracking.log_metrics(uri, run_id, summary)
    for file_name, fig in (figures or {}).items():
        tracking.log_figure(uri, run_id, fig, file_name)
    tracking.end_run(uri, run_id)
    out = Path(os.environ.get("V3FLOW_BENCH_RESULTS") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({**tags, **params, **summary}, indent=2))
    print(f"logged to MLflow run {run_id} at {uri}")
    return run_id


def main() -> None:
    """`python benchmarks/record.py NAME RESULT.json`: record a result measured on another machine (a GPU
    lent for the session, say): numbers become metrics, everything else tags."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("name", help="benchmark name (the MLflow run name)")
    parser.add_argument("result", type=Path, help="JSON object of the measured values")
    args = parser.parse_args()
    data = json.loads(args.result.read_text())
    numbers = {k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    record(args.name, numbers, {k: str(v) for k, v in data.items() if k not in numbers}, {})


if __name__ == "__main__":
    main()
