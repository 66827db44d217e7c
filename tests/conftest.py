"""Shared fixtures. End-to-end tests start real Prefect and MLflow servers with v3flow's own server code."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MICRO = ROOT / "configs" / "micro.yaml"
TINY = ROOT / "configs" / "tiny.yaml"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def micro_workdir(tmp_path_factory) -> Path:
    """One stage workdir for the micro config, shared by the stage tests: each stage runs once per session and
    is reused from the cache after (as in a real workdir)."""
    return tmp_path_factory.mktemp("micro-work")


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """Real Prefect + MLflow servers on free loopback ports, state in a temporary V3FLOW_HOME."""
    home = tmp_path_factory.mktemp("v3flow-home")
    env = {**os.environ, "V3FLOW_HOME": str(home), "V3FLOW_PREFECT_PORT": str(free_port()),
           "V3FLOW_MLFLOW_PORT": str(free_port()),
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}  # schedules make their runs within seconds
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        env.pop(key, None)
    v3flow = [sys.executable, "-m", "v3flow.cli"]
    subprocess.run(v3flow + ["up"], env=env, check=True, cwd=ROOT, timeout=300)
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{env['V3FLOW_PREFECT_PORT']}/api"
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{env['V3FLOW_MLFLOW_PORT']}"
    env["PREFECT_HOME"] = str(home / "prefect")
    yield env
    subprocess.run(v3flow + ["down"], env=env, cwd=ROOT, timeout=120, check=False)
