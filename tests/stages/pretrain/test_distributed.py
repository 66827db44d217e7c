"""Two data-parallel processes (gloo on CPU) reach the loss of one process with the same global batch."""

from __future__ import annotations

from tests.stages.pretrain.conftest import losses, write_run
from v3flow.stages.pretrain import launch


def test_two_processes_match_one(tmp_path, micro_data):
    one, two = tmp_path / "one", tmp_path / "two"
    launch(write_run(one, micro_data), one)
    launch(write_run(two, micro_data, ["pretrain.num_processes=2", "pretrain.micro_batch=2"]), two)
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) < 2e-3 * a[step]["loss"], (step, a[step], b[step])
    assert b[max(b)]["batch_sequences"] == a[max(a)]["batch_sequences"]
