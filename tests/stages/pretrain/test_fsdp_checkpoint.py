"""Checkpoints of an FSDP2-sharded model (2 gloo processes, torch fully_shard): gathered into the same full
safetensors a one-process run writes, and loaded back into a sharded model that then trains bit for bit
like the uninterrupted one. (accelerate itself shards only on GPUs; this covers our checkpoint code.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_sharded_checkpoint_gathers_and_resumes_exactly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(Path(__file__).with_name("fsdp_worker.py")), str(tmp_path)],
                          env=env, timeout=300, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["state_note"] == "fsdp"
    assert report["keys_match"]
    assert report["max_diff_vs_one_process"] < 1e-5, report
    assert report["resumed_bit_exact"], report
