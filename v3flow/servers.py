"""The local Prefect and MLflow servers: started by us, on 127.0.0.1, with their state in one folder.

    v3flow up      start whichever of the two is not already answering (idempotent)
    v3flow down    stop the servers this folder started
    v3flow status  show addresses and health

State lives under `$V3FLOW_HOME` (default `.v3flow/` in the project, git-ignored): Prefect's SQLite
database and home, MLflow's SQLite database and artifact folder, logs and pid files. Teams point both
servers at Postgres instead with V3FLOW_PREFECT_DB_URL and V3FLOW_MLFLOW_BACKEND_URI (see infra/).
Ports: V3FLOW_PREFECT_PORT (4200), V3FLOW_MLFLOW_PORT (5000); host: V3FLOW_HOST (127.0.0.1).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from v3flow.errors import ServerError


def home() -> Path:
    path = Path(os.environ.get("V3FLOW_HOME") or Path.cwd() / ".v3flow").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def host() -> str:
    return os.environ.get("V3FLOW_HOST", "127.0.0.1")


@dataclass(frozen=True)
class Server:
    name: str
    port_env: str
    default_port: int
    health_path: str

    @property
    def port(self) -> int:
        return int(os.environ.get(self.port_env, self.default_port))

    @property
    def url(self) -> str:
        return f"http://{host()}:{self.port}"

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.health_path, timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False


PREFECT = Server("prefect", "V3FLOW_PREFECT_PORT", 4200, "/api/health")
MLFLOW = Server("mlflow", "V3FLOW_MLFLOW_PORT", 5000, "/health")


def local_mlflow_uri() -> str:
    return MLFLOW.url


def local_prefect_api() -> str:
    return PREFECT.url + "/api"


def prefect_env() -> dict[str, str]:
    """Settings shared by our Prefect server and the processes that talk to it."""
    state = home() / "prefect"
    state.mkdir(exist_ok=True)
    return {
        "PREFECT_HOME": str(state),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": os.environ.get(
            "V3FLOW_PREFECT_DB_URL", f"sqlite+aiosqlite:///{state / 'prefect.db'}"
        ),
    }


def _prefect_server_env() -> dict[str, str]:
    # The UI derives its API address from these, not from --port: without them a server on another
    # port serves a UI that talks to the API on 4200.
    return {"PREFECT_SERVER_API_HOST": host(), "PREFECT_SERVER_API_PORT": str(PREFECT.port),
            "PREFECT_UI_API_URL": local_prefect_api()}


def _command(server: Server) -> list[str]:
    bindir = Path(sys.executable).parent
    if server is PREFECT:
        return [str(bindir / "prefect"), "server", "start", "--host", host(), "--port", str(server.port)]
    state = home() / "mlflow"
    state.mkdir(exist_ok=True)
    backend = os.environ.get("V3FLOW_MLFLOW_BACKEND_URI", f"sqlite:///{state / 'mlflow.db'}")
    return [str(bindir / "mlflow"), "server", "--backend-store-uri", backend,
            "--artifacts-destination", str(state / "artifacts"), "--host", host(), "--port", str(server.port),
            "--workers", "1"]


def _pid_file(server: Server) -> Path:
    return home() / f"{server.name}.pid"


def ours(server: Server) -> bool:
    """Whether the process listening on `server`'s port was started from this state folder: it belongs to the
    session whose leader's pid we recorded (both servers start in a session of their own)."""
    import psutil

    pid_file = _pid_file(server)
    if not pid_file.exists():
        return False
    leader = int(pid_file.read_text())
    try:
        listening = [c.pid for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port and c.pid]
    except psutil.AccessDenied:  # macOS lists sockets for root only: trust a live recorded process
        return psutil.pid_exists(leader)
    for pid in listening:
        try:
            if os.getsid(pid) == leader:
                return True
        except ProcessLookupError:
            continue
    return False


def _check_owner(server: Server) -> None:
    if not ours(server):
        raise ServerError(
            f"a {server.name} server answers on {server.url} but was not started from {home()} (another project's "
            f"or another checkout's): its runs and state would mix with this one's. Stop it, pick another port with "
            f"{server.port_env}, or point at it on purpose with "
            f"{'PREFECT_API_URL' if server is PREFECT else 'MLFLOW_TRACKING_URI'}.")


def start(server: Server, wait_s: float = 120) -> str:
    """Start `server` in its own session unless it already answers; returns its URL. A server on the port that
    this state folder did not start is refused."""
    if server.healthy():
        _check_owner(server)
        return server.url
    logs = home() / "logs"
    logs.mkdir(exist_ok=True)
    # MLflow's job runner (huey consumers for GenAI judges/prompt jobs) costs ~2 GB in 8 processes and is
    # unused by a training pipeline; teams that want it set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true.
    env = {**os.environ, **prefect_env(), **_prefect_server_env()} if server is PREFECT else {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    env.pop("MLFLOW_RUN_ID", None)
    with open(logs / f"{server.name}.log", "ab") as log:
        proc = subprocess.Popen(_command(server), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=home())
    _pid_file(server).write_text(str(proc.pid))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if server.healthy():
            return server.url
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = (logs / f"{server.name}.log").read_text(errors="replace")[-2000:]
    raise ServerError(f"{server.name} server did not come up on {server.url} (see {logs / server.name}.log):\n{tail}")


def stop(server: Server) -> bool:
    pid_file = _pid_file(server)
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(40):
            os.killpg(pid, 0)
            time.sleep(0.25)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pid_file.unlink(missing_ok=True)
    return True


def up() -> dict[str, str]:
    """Start both servers (whichever is not up); returns {'prefect': ui url, 'mlflow': ui url}."""
    return {"prefect": start(PREFECT), "mlflow": start(MLFLOW)}


def down() -> list[str]:
    return [s.name for s in (PREFECT, MLFLOW) if stop(s)]


def ensure_for_run(tracking_uri: str | None = None) -> dict[str, str]:
    """Point this process at Prefect and MLflow, starting the local servers only where nothing is configured.

    PREFECT_API_URL and MLFLOW_TRACKING_URI win when set; a tracking URI from the config wins for MLflow.
    """
    urls = {}
    if not os.environ.get("PREFECT_API_URL"):
        urls["prefect"] = start(PREFECT)
        os.environ.update(prefect_env())
        os.environ["PREFECT_API_URL"] = local_prefect_api()
    else:
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        urls["prefect"] = os.environ["PREFECT_API_URL"].removesuffix("/api")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri
    if not uri:
        uri = start(MLFLOW)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    urls["mlflow"] = uri
    return urls
