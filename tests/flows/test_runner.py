"""Stage runner pieces that need no server: which failures retry, and how the cache key is formed."""

from __future__ import annotations

import re

import pytest
from prefect.states import Completed, Failed

from tests.conftest import MICRO
from v3flow.errors import ConfigError
from flows.config import load_config
from flows.pipeline import STAGES, plan, wiring
from flows.runner import _transient, stage_key


def test_only_transient_io_errors_retry():
    assert _transient(None, None, Failed(data=ConnectionError("reset by peer")))
    assert _transient(None, None, Failed(data=TimeoutError()))
    assert not _transient(None, None, Failed(data=ValueError("bad data")))
    assert not _transient(None, None, Completed(data=1))


def test_stage_key_follows_config_and_inputs():
    spec = STAGES["data"]
    base = stage_key(spec, load_config(MICRO), {})
    assert stage_key(spec, load_config(MICRO), {}) == base
    assert stage_key(spec, load_config(MICRO, ["data.packing.seq_len=64", "extension.yarn.original_seq_len=64"]), {}) == base  # the pack stage's
    assert stage_key(spec, load_config(MICRO, ["data.val_fraction=0.1"]), {}) != base
    assert stage_key(spec, load_config(MICRO, ["data.executor.workers=1"]), {}) == base
    assert stage_key(spec, load_config(MICRO, ["data.sources.0.include=[json/*]"]), {}) != base


def test_plan_adds_upstream_stages_in_order():
    assert plan([]) == list(STAGES)
    assert plan(["data"]) == ["data"]


def test_inputs_are_wired_by_role_and_the_config_can_rewire_them():
    assert wiring() == {"data": {}, "pack": {"corpus": "data"}, "pretrain": {"data": "pack"},
                        "pack_phase1": {"corpus": "data"}, "extend_phase1": {"model": "pretrain", "data": "pack_phase1"},
                        "pack_phase2": {"corpus": "data"},
                        "extend_phase2": {"model": "extend_phase1", "data": "pack_phase2"},
                        "long_eval": {"base": "pretrain", "phase1": "extend_phase1", "phase2": "extend_phase2",
                                      "corpus": "data", "short": "pack"},
                        "distill": {"model": "extend_phase2"}, "sft": {"model": "extend_phase2", "data": "distill"},
                        "grpo": {"model": "sft"}, "task_eval": {"base": "extend_phase2", "sft": "sft", "grpo": "grpo"},
                        "evaluate": {"pretrain": "pretrain", "extend_phase1": "extend_phase1",
                                     "extend_phase2": "extend_phase2", "sft": "sft", "grpo": "grpo", "val": "pack",
                                     "long": "long_eval", "tasks": "task_eval"}}
    assert plan(["pretrain"]) == ["data", "pack", "pretrain"]
    assert plan(["extend_phase2"]) == ["data", "pack", "pretrain", "pack_phase1", "extend_phase1", "pack_phase2",
                                       "extend_phase2"]
    assert plan(["pack_phase2"]) == ["data", "pack_phase2"]  # packing a phase needs only the corpus
    rewired = wiring(load_config(MICRO, ["inputs.pretrain.data=pack"]))  # explicit, same as the default
    assert rewired["pretrain"] == {"data": "pack"}
    skip = wiring(load_config(MICRO, ["inputs.sft.model=pretrain"]))  # post-training without context extension
    assert skip["sft"] == {"model": "pretrain", "data": "distill"}
    for override, message in [("inputs.rlhf.model=pretrain", "inputs.rlhf: no such stage"),
                              ("inputs.pretrain.model=pack", "stage pretrain has no input 'model'"),
                              ("inputs.pack.corpus=pretrain", "must be one of the stages before pack: ['data']")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            wiring(load_config(MICRO, [override]))
    # the plan follows the wiring: a stage whose input is rewired needs the new provider, not the old one
    assert plan(["pack"], {"data": {}, "pack": {}, "pretrain": {"data": "pack"}}) == ["pack"]
