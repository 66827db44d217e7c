"""Run a training module in its own process group, streaming its output; shared by every training stage.

One process by default; several through torchrun (DDP; gloo on CPU, NCCL on GPU) or `accelerate launch`
with an accelerate config (FSDP2, multi-node). A child process group means a cancelled or crashed flow run
kills every worker (os.killpg; Prefect signals only the flow process), and a killed run restarts from its
last checkpoint when the stage runs again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

from v3flow.errors import V3flowError


class TrainingError(V3flowError):
    """The training process failed; the message carries the tail of its output."""


def command(module: str, run_dir: Path, num_processes: int, launcher: str, accelerate_config: Path | None) -> list[str]:
    args = ["-m", module, str(run_dir)]
    if num_processes == 1:
        return [sys.executable, *args]
    if launcher == "accelerate":  # (not --cpu: it collapses the processes into one; the trainer picks gloo)
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
                "--config_file", str(accelerate_config), *args]
    # --standalone: torchrun binds its own free loopback rendezvous port (no pick-then-bind race)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
            *args]


def check_launcher(launcher: str, accelerate_config: Path | None, key: str) -> None:
    """accelerate runs FSDP only on accelerators: on a CPU machine it would quietly fall back to plain data
    parallelism, so refuse an FSDP accelerate config there instead of training something else."""
    import torch
    import yaml

    if launcher != "accelerate" or torch.cuda.is_available():
        return
    if yaml.safe_load(Path(accelerate_config).read_text()).get("distributed_type") == "FSDP":
        raise TrainingError(f"{key}={accelerate_config}: distributed_type FSDP needs GPUs (accelerate shards only "
                            "on accelerators); on CPU use configs/accelerate/ddp.yaml or launcher: torchrun")


def launch(module: str, run_dir: Path, num_processes: int = 1, launcher: str = "torchrun",
           accelerate_config: Path | None = None, env: dict | None = None, prefix: str = "[",
           config_key: str = "accelerate_config") -> None:
    """Run `python -m module run_dir` to completion under the chosen launcher, echoing the lines that start
    with `prefix`; kill its whole process group on interruption."""
    check_launcher(launcher, accelerate_config, config_key)
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    if num_processes > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    proc = subprocess.Popen(command(module, run_dir, num_processes, launcher, accelerate_config),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    tail: deque[str] = deque(maxlen=40)
    try:
        for line in proc.stdout:
            tail.append(line.rstrip())
            if line.startswith(prefix):
                print(line.rstrip(), flush=True)
        code = proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # a cancelled flow run must not leave workers behind
        proc.wait()
        raise
    if code != 0:
        raise TrainingError(f"training exited with status {code}; last output:\n" + "\n".join(tail))
