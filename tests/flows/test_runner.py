"""Stage runner pieces that need no server: which failures retry, how the cache key is formed, and the
invariants of the recipe's wiring (every role filled by an earlier stage, plans closed under their inputs)."""

from __future__ import annotations

import re

import pytest
from prefect.states import Completed, Failed

from flows.config import PipelineConfig, load_config
from flows.executor import stage_key
from flows.recipe import MODEL_STAGES, PHASES, RECIPE, STAGES, plan, wiring
from flows.runner import _transient
from tests.conftest import MICRO
from v3flow.errors import ConfigError


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


def test_every_role_is_filled_by_an_earlier_stage_and_plans_are_closed():
    """The wiring's invariants, for the recipe as it is (not a copy of it)."""
    order, wires = list(STAGES), wiring()
    assert len(order) == len(RECIPE) and set(wires.inputs) == set(order)
    for name, roles in wires.inputs.items():
        assert all(order.index(up) < order.index(name) for up in roles.values()), name
        assert plan([name]) == [s for s in order if s in plan([name])]  # in pipeline order
        assert set(plan([name])) == {name} | {s for up in roles.values() for s in plan([up])}  # closed, and minimal
    assert MODEL_STAGES == tuple(s.name for s in RECIPE if s.model) and "pretrain" in MODEL_STAGES
    evaluator = [s for s in RECIPE if set(MODEL_STAGES) <= set(wires.inputs[s.name].values())]
    assert evaluator, "a stage measures every model of the chain"
    assert all(set(stages) <= set(order) and stages for stages in PHASES.values())


def test_every_stage_declares_what_it_reads_once():
    """One name per stage; each YAML section it reads is in the pipeline config, with one schema."""
    assert len({s.name for s in RECIPE}) == len(RECIPE)
    cfg = load_config(MICRO)
    for spec in RECIPE:
        for path in spec.settings:
            node = cfg
            for part in path.split("."):
                node = getattr(node, part)
        assert spec.section(cfg, wiring(cfg)).hashable() is not None
    assert {"data", "model", "pretrain", "extension", "posttrain", "evaluation"} <= set(PipelineConfig.model_fields)


def test_the_config_can_rewire_inputs():
    defaults = wiring().inputs
    assert plan(["pretrain"]) == ["data", "pack", "pretrain"]
    assert plan(["pack_phase2"]) == ["data", "pack_phase2"]  # packing a phase needs only the corpus
    rewired = wiring(load_config(MICRO, ["inputs.pretrain.data=pack"]))  # explicit, same as the default
    assert rewired.inputs["pretrain"] == defaults["pretrain"] == {"data": "pack"}
    skip = wiring(load_config(MICRO, ["inputs.sft.model=pretrain"]))  # post-training without context extension
    assert skip.inputs["sft"] == {**defaults["sft"], "model": "pretrain"}
    for override, message in [("inputs.rlhf.model=pretrain", "inputs.rlhf: no such stage"),
                              ("inputs.pretrain.model=pack", "stage pretrain has no input 'model'"),
                              ("inputs.pack.corpus=pretrain", "must be one of the stages before pack: ['data']")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            wiring(load_config(MICRO, [override]))
