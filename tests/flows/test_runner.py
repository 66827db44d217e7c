"""Stage runner pieces that need no server: which failures retry, and how the cache key is formed."""

from __future__ import annotations

from prefect.states import Completed, Failed

from tests.conftest import MICRO
from v3flow.flows.config import load_config
from v3flow.flows.pipeline import STAGES, plan
from v3flow.flows.runner import _transient, stage_key


def test_only_transient_io_errors_retry():
    assert _transient(None, None, Failed(data=ConnectionError("reset by peer")))
    assert _transient(None, None, Failed(data=TimeoutError()))
    assert not _transient(None, None, Failed(data=ValueError("bad data")))
    assert not _transient(None, None, Completed(data=1))


def test_stage_key_follows_config_and_inputs():
    spec = STAGES["data"]
    base = stage_key(spec, load_config(MICRO), {})
    assert stage_key(spec, load_config(MICRO), {}) == base
    assert stage_key(spec, load_config(MICRO, ["data.packing.seq_len=64"]), {}) == base  # the pack stage's
    assert stage_key(spec, load_config(MICRO, ["data.val_fraction=0.1"]), {}) != base
    assert stage_key(spec, load_config(MICRO, ["data.executor.workers=1"]), {}) == base
    assert stage_key(spec, load_config(MICRO, ["data.sources.0.include=[json/*]"]), {}) != base


def test_plan_adds_upstream_stages_in_order():
    assert plan([]) == list(STAGES)
    assert plan(["data"]) == ["data"]
