"""A run killed with SIGKILL and restarted continues from its last checkpoint, bit for bit."""

from __future__ import annotations

import json

import pytest

from tests.stages.pretrain.conftest import losses, write_run
from tests.training import faults
from v3flow.training.train import TrainingError, run_loop


def test_sigkill_and_restart_reproduces_the_uninterrupted_run(tmp_path, micro_data, capfd):
    straight = tmp_path / "straight"
    cfg = write_run(straight, micro_data)
    run_loop(cfg.pretrain, straight)

    killed = tmp_path / "killed"
    write_run(killed, micro_data)
    with pytest.raises(TrainingError, match="status -9"):
        run_loop(cfg.pretrain, killed, env=faults.env(kill_at=8))  # after the step-5 checkpoint
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_000005"]
    # the restart keeps the precision its run chose (auto times matmuls: where BF16 and FP32 run about as fast,
    # a second timing may decide otherwise, and the resumed steps would differ)
    chosen = json.loads((killed / "precision.json").read_text())
    (killed / "precision.json").write_text(json.dumps({**chosen, "reason": "the run's first choice"}))
    capfd.readouterr()
    run_loop(cfg.pretrain, killed)
    assert "the run's first choice" in capfd.readouterr().out

    a, b = losses(straight), losses(killed)
    assert a.keys() == b.keys() and len(a) >= 10
    for step in a:  # identical floats, not merely close
        assert (a[step]["loss"], a[step]["mtp_loss"], a[step].get("grad_norm")) == \
               (b[step]["loss"], b[step]["mtp_loss"], b[step].get("grad_norm")), step
    assert (straight / "final.json").read_text() == (killed / "final.json").read_text()


def test_guard_skips_a_corrupted_step(tmp_path, micro_data):
    run = tmp_path / "nan"
    cfg = write_run(run, micro_data)
    run_loop(cfg.pretrain, run, env=faults.env(nan_at=(3,)))
    records = losses(run)
    assert "grad_norm" not in records[4]  # step index 3 is record 4: no update was applied
    assert "skipped update" in (run / "events.log").read_text()
    final = json.loads((run / "final.json").read_text())
    assert final["skipped_steps"] == 1 and final["rollbacks"] == 0


def test_repeated_bad_steps_roll_back_to_the_last_checkpoint(tmp_path, micro_data):
    run = tmp_path / "rollback"
    cfg = write_run(run, micro_data)
    run_loop(cfg.pretrain, run, env=faults.env(nan_at=(6, 7, 8)))  # max_skips=3 bad steps after step 5
    final = json.loads((run / "final.json").read_text())
    assert final["skipped_steps"] == 3 and final["rollbacks"] == 1
    assert "rolled back to step_000005" in (run / "events.log").read_text()
    assert all(r["loss"] == r["loss"] for r in losses(run).values() if "grad_norm" in r)  # no NaN was applied
