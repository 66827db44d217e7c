"""The Prefect flows: `pipeline` (the whole recipe, or chosen stages), `stage` (one), and one per phase of the
recipe (`extend`, `posttrain`), all taking a request form that the Prefect UI renders with dropdowns.

A request names a config file, overrides and stages. Chosen stages run with the upstream stages they need:
those are reused from the cache when unchanged and run otherwise. Run from Python with
`pipeline(RunRequest(config="configs/tiny.yaml"))` or, as users do, `v3flow run configs/tiny.yaml`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

from prefect import flow
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed
from pydantic import BaseModel, Field

from flows.bookkeeping import ParentRun, close_orphans
from flows.config import load_config
from flows.recipe import PHASES, STAGES, plan, wiring
from flows.runner import end_status, run_stage
from v3flow import tracking
from v3flow.errors import V3flowError
from v3flow.stage import StageResult

StageName = Literal[tuple(STAGES)]  # a dropdown in the Prefect UI's forms
SHIPPED_CONFIGS = sorted(f"configs/{p.name}" for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
_CONFIG = Field("configs/tiny.yaml", description="Pipeline config YAML, relative to the project folder.",
                json_schema_extra={"enum": SHIPPED_CONFIGS} if SHIPPED_CONFIGS else None)
_OVERRIDES = Field(default_factory=list, description="key=value, e.g. data.minhash.bands=20 (checked before the run "
                   "starts: an unknown key or a bad value fails it at once, naming the key)")
_FORCE = Field(False, description="Rerun the chosen stages even when their outputs are cached (the stages they need "
               "are reused when unchanged).")


class RunRequest(BaseModel):
    """What to run: a config, overrides, and optionally a subset of stages."""

    config: str = _CONFIG  # the UI offers the shipped configs; the CLI takes any path
    overrides: list[str] = _OVERRIDES
    stages: list[StageName] = Field(default_factory=list, description="Stages to run, with the stages they need; "
                                    "none chosen runs the whole recipe.")
    force: bool = _FORCE


class StageRequest(BaseModel):
    """Run one stage: the stages it needs are reused from the cache when unchanged, and run first otherwise."""

    stage: StageName = Field("data", description="The stage to run.")
    config: str = _CONFIG
    overrides: list[str] = _OVERRIDES
    force: bool = _FORCE


class PhaseRequest(BaseModel):
    """Run a phase of the recipe (its stages, and the stages they need from earlier phases)."""

    config: str = _CONFIG
    overrides: list[str] = _OVERRIDES
    force: bool = _FORCE


def execute(request: RunRequest, entry_point: str = "pipeline") -> dict[str, dict]:
    """Validate, then run the planned stages under one MLflow parent run; returns each stage's metrics."""
    cfg = load_config(_config_path(request.config), request.overrides)
    wires = wiring(cfg)
    order = plan(request.stages, wires)
    force = set((request.stages or order) if request.force else ())
    uri = tracking.tracking_uri(cfg.tracking.tracking_uri)
    source = tracking.source_tags(Path(cfg.project_root or "."), f"v3flow {entry_point} ({cfg.name})")
    close_orphans(uri, cfg.tracking.experiment)
    parent = ParentRun(cfg, wires, order, force, f"{cfg.name} {flow_run.get_name() or 'run'}", {
        **source, "prefect.flow_run_id": str(flow_run.get_id() or ""), "v3flow.overrides": " ".join(request.overrides),
        "mlflow.note.content": _describe(cfg.name, request, order)})
    results: dict[str, StageResult] = {}
    cached: set[str] = set()
    try:
        for name in order:
            inputs = {role: results[stage] for role, stage in wires.inputs[name].items()}
            start = time.monotonic()
            state = run_stage(STAGES[name], cfg, wires, inputs, name in force, parent.run_id, uri, source,
                              return_state=True)
            results[name] = state.result()
            if state.name == "Cached":
                cached.add(name)
            parent.stage_done(name, results[name], name in cached, time.monotonic() - start)
    except BaseException as exc:
        parent.fail(end_status(exc))
        raise
    parent.finish(results)
    return {name: {"key": r.key, "out_dir": r.out_dir, "cached": name in cached,
                   "mlflow_run_id": r.mlflow_run_id, "metrics": r.metrics} for name, r in results.items()}


def _describe(config: str, request: RunRequest, order: list[str]) -> str:
    """The parent run's description (MLflow shows it on the run page)."""
    from prefect.settings import PREFECT_API_URL

    ui = (PREFECT_API_URL.value() or "").removesuffix("/api")
    lines = [f"Pipeline run of config **{config}** (`{request.config}`).",
             f"Overrides: {', '.join(f'`{o}`' for o in request.overrides) or 'none'}.",
             f"Stages: {', '.join(order)}; forced: {', '.join(request.stages or order) if request.force else 'none'}."]
    if flow_run.get_id():
        lines.append(f"Prefect flow run: [{flow_run.get_name()}]({ui}/runs/flow-run/{flow_run.get_id()}).")
    return "\n\n".join(lines)


def _config_path(path: str) -> str:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    home = os.environ.get("V3FLOW_PROJECT")  # the project folder, for deployments served from elsewhere
    return str(Path(home) / p) if home else str(p)


def _run(request: RunRequest, entry_point: str):
    """`execute`, with a v3flow error (bad config, bad data, a failed trainer) as the flow run's Failed state whose
    message is the one-line cause, logged first, instead of a traceback."""
    try:
        return execute(request, entry_point)
    except V3flowError as err:
        cause = f"{type(err).__name__}: {err}"
        get_run_logger().error(cause)
        return Failed(message=cause, data=err)


@flow(name="pipeline", log_prints=True)
def pipeline(request: RunRequest = RunRequest()) -> dict[str, dict]:
    """The whole DeepSeek-V3 recipe, or the chosen stages and what they need."""
    return _run(request, "pipeline")


@flow(name="stage", log_prints=True)
def stage(request: StageRequest = StageRequest()) -> dict[str, dict]:
    """One stage of the recipe, on the newest outputs of the stages before it."""
    return _run(RunRequest(config=request.config, overrides=request.overrides, stages=[request.stage],
                           force=request.force), f"stage {request.stage}")


def _phase(name: str, request: PhaseRequest) -> dict[str, dict]:
    return _run(RunRequest(config=request.config, overrides=request.overrides, stages=list(PHASES[name]),
                           force=request.force), name)


@flow(name="extend", log_prints=True)
def extend(request: PhaseRequest = PhaseRequest()) -> dict[str, dict]:
    """Context extension: both YaRN phases and the long-context evaluation, from the newest pretrained model
    of the config (reused from the cache, or trained first)."""
    return _phase("extend", request)


@flow(name="posttrain", log_prints=True)
def posttrain(request: PhaseRequest = PhaseRequest()) -> dict[str, dict]:
    """Post-training: R1-style distillation, SFT, GRPO and the held-out task evaluation, from the newest
    extended model of the config (reused from the cache, or trained first)."""
    return _phase("posttrain", request)
