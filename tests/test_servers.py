"""`v3flow up / status / run` trust only the servers their own state folder started."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

from tests.conftest import ROOT, free_port


def v3flow(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "v3flow.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


def test_a_server_another_folder_started_is_refused(tmp_path):
    """Something else answers Prefect's health check on the port (another project's server, here a file server
    that has the health path): `up` refuses it with the reason instead of sending this project's runs there."""
    site = tmp_path / "site"
    (site / "api").mkdir(parents=True)
    (site / "api" / "health").write_text("true")
    port = free_port()
    foreign = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=site,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "the stand-in server did not start"
                time.sleep(0.2)
        env = {**os.environ, "V3FLOW_HOME": str(tmp_path / "home"), "V3FLOW_PREFECT_PORT": str(port)}
        env.pop("PREFECT_API_URL", None)
        up = v3flow(env, "up")
        assert up.returncode == 2
        assert f"a prefect server answers on http://127.0.0.1:{port} but was not started from" in up.stderr
        assert "V3FLOW_PREFECT_PORT" in up.stderr
        status = v3flow(env, "status")
        assert f"up, but not started from {tmp_path / 'home'}" in status.stdout
    finally:
        foreign.terminate()
        foreign.wait(timeout=30)


def test_the_servers_this_folder_started_are_its_own(servers):
    status = v3flow(servers, "status")
    assert status.returncode == 0
    lines = status.stdout.splitlines()
    assert [line.split()[-1] for line in lines] == ["up", "up"], status.stdout
