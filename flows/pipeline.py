"""The `pipeline` flow and one flow per stage, all taking the same request form.

The stage list below is the pipeline: adding a stage is a module under stages/ plus one `StageSpec`
line here (and its three-line flow at the bottom, so it can be deployed on its own).

A request names a config file, overrides and stages. Chosen stages run with the upstream stages they
need: those are reused from the cache when unchanged and run otherwise. Run from Python with
`pipeline(RunRequest(config="configs/tiny.yaml"))` or, as users do, `v3flow run configs/tiny.yaml`.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from v3flow import cache, tracking
from v3flow.errors import ConfigError
from v3flow.flows.config import PipelineConfig, load_config
from v3flow.flows.runner import StageSpec, key_parts, run_stage
from v3flow.section import section_hash
from v3flow.stage import StageResult, chain_lineage
from v3flow.stages import data as data_stage
from v3flow.stages import distill as distill_stage
from v3flow.stages import extend as extend_stage
from v3flow.stages import grpo as grpo_stage
from v3flow.stages import pack as pack_stage
from v3flow.stages import pretrain as pretrain_stage
from v3flow.stages import sft as sft_stage
from v3flow.stages import task_eval as task_eval_stage
from v3flow.stages.extend import evaluate as long_eval_stage
from v3flow.stages.pretrain.config import PretrainStageConfig

TRAINING_LIBRARIES = ("torch", "accelerate", "transformers", "safetensors", "numpy")
POSTTRAIN_LIBRARIES = (*TRAINING_LIBRARIES, "trl", "datasets", "tokenizers")
STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec("data", data_stage, lambda cfg: cfg.data,
                  libraries=("datatrove", "tokenizers", "transformers", "spacy", "numpy")),
        StageSpec("pack", pack_stage, lambda cfg: cfg.data.packing, inputs={"corpus": "data"}, libraries=("numpy",)),
        StageSpec("pretrain", pretrain_stage, lambda c: PretrainStageConfig(model=c.model, pretrain=c.pretrain),
                  inputs={"data": "pack"}, libraries=TRAINING_LIBRARIES),
        *[spec for phase, start in (("phase1", "pretrain"), ("phase2", "extend_phase1")) for spec in (
            StageSpec(f"pack_{phase}", pack_stage,
                      lambda c, p=phase: extend_stage.packing(c.data.packing, c.extension, p),
                      inputs={"corpus": "data"}, libraries=("numpy",)),
            StageSpec(f"extend_{phase}", extend_stage,
                      lambda c, p=phase: extend_stage.section(c.model, c.pretrain, c.extension, p),
                      inputs={"model": start, "data": f"pack_{phase}"}, libraries=TRAINING_LIBRARIES))],
        StageSpec("long_eval", long_eval_stage, lambda c: long_eval_stage.section(c.data.packing.seq_len, c.extension),
                  inputs={"base": "pretrain", "phase1": "extend_phase1", "phase2": "extend_phase2", "corpus": "data",
                          "short": "pack"}, libraries=(*TRAINING_LIBRARIES, "tokenizers", "matplotlib")),
        StageSpec("distill", distill_stage,
                  lambda c: distill_stage.DistillStageConfig(task=c.posttrain.task, distill=c.posttrain.distill),
                  inputs={"model": "extend_phase2"}, libraries=("transformers", "tokenizers", "datasets", "math_verify",
                                                                "openai", "pyarrow")),
        StageSpec("sft", sft_stage, lambda c: c.posttrain.sft, inputs={"model": "extend_phase2", "data": "distill"},
                  libraries=POSTTRAIN_LIBRARIES),
        StageSpec("grpo", grpo_stage, lambda c: grpo_stage.GrpoStageConfig(task=c.posttrain.task, grpo=c.posttrain.grpo),
                  inputs={"model": "sft"}, libraries=(*POSTTRAIN_LIBRARIES, "math_verify")),
        StageSpec("task_eval", task_eval_stage,
                  lambda c: task_eval_stage.TaskEvalStageConfig(task=c.posttrain.task, eval=c.posttrain.eval),
                  inputs={"base": "extend_phase2", "sft": "sft", "grpo": "grpo"},
                  libraries=(*TRAINING_LIBRARIES, "tokenizers", "math_verify")),
    ]
}

EXTENSION_STAGES = ("pack_phase1", "extend_phase1", "pack_phase2", "extend_phase2", "long_eval")
POSTTRAIN_STAGES = ("distill", "sft", "grpo", "task_eval")


class RunRequest(BaseModel):
    """What to run: a config, overrides, and optionally a subset of stages."""

    config: str = Field("configs/tiny.yaml", description="Pipeline config YAML, relative to the project folder.")
    overrides: list[str] = Field(default_factory=list, description="key=value, e.g. data.minhash.bands=20")
    stages: list[str] = Field(default_factory=list, description=f"Stages to run; empty runs all: {list(STAGES)}")
    force: list[str] = Field(default_factory=list, description="Stages to rerun even when their outputs are cached.")


def wiring(cfg: PipelineConfig | None = None) -> dict[str, dict[str, str]]:
    """Which stage fills each input role of each stage: the StageSpec defaults, changed by the config's `inputs`
    (e.g. `inputs: {sft: {model: pretrain}}` when context extension is off). A role can only be filled by an
    earlier stage."""
    order = list(STAGES)
    wires = {name: dict(spec.inputs) for name, spec in STAGES.items()}
    for stage, roles in (cfg.inputs if cfg else {}).items():
        if stage not in STAGES:
            raise ConfigError(f"config key inputs.{stage}: no such stage; the pipeline has {order}")
        for role, provider in roles.items():
            if role not in wires[stage]:
                raise ConfigError(f"config key inputs.{stage}.{role}: stage {stage} has no input {role!r} "
                                  f"(its inputs: {list(wires[stage])})")
            earlier = order[:order.index(stage)]
            if provider not in earlier:
                raise ConfigError(f"config key inputs.{stage}.{role}={provider!r}: must be one of the stages before "
                                  f"{stage}: {earlier}")
            wires[stage][role] = provider
    return wires


def plan(stages: list[str], wires: dict[str, dict[str, str]] | None = None) -> list[str]:
    """Chosen stages plus the stages that fill their inputs, in pipeline order."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; the pipeline has {list(STAGES)}")
    wires = wires or wiring()
    wanted: set[str] = set()

    def need(name: str) -> None:
        wanted.add(name)
        for up in wires[name].values():
            need(up)

    for name in stages or list(STAGES):
        need(name)
    return [name for name in STAGES if name in wanted]


def execute(request: RunRequest) -> dict[str, dict]:
    """Validate, then run the planned stages under one MLflow parent run; returns each stage's metrics."""
    cfg = load_config(_config_path(request.config), request.overrides)
    wires = wiring(cfg)
    order = plan(request.stages, wires)
    force = set(request.force)
    uri = tracking.tracking_uri(cfg.tracking.tracking_uri)
    tags = {
        "prefect.flow_run_id": str(flow_run.get_id() or ""),
        "git.commit": tracking.git_commit(Path(cfg.project_root or ".")),
        "v3flow.config_hash": section_hash(cfg),
        "v3flow.config": cfg.name,
        "v3flow.stages": ",".join(order),
    }
    parent = tracking.start_run(uri, cfg.tracking.experiment, f"pipeline-{cfg.name}", tags,
                                tracking.flatten(cfg.model_dump(mode="json")))
    tracking.log_text(uri, parent, cfg.model_dump_json(indent=2), "config.json")
    results: dict[str, StageResult] = {}
    cached: set[str] = set()
    try:
        for name in order:
            spec = STAGES[name]
            inputs = {role: results[stage] for role, stage in wires[name].items()}
            state = run_stage(spec, cfg, inputs, name in force, parent, uri, return_state=True)
            results[name] = state.result()
            if state.name == "Cached":
                cached.add(name)
    except BaseException:
        tracking.end_run(uri, parent, "FAILED")
        raise
    tracking.set_tags(uri, parent, {f"v3flow.{n}.key": r.key for n, r in results.items()})
    tracking.end_run(uri, parent)
    return {name: {"key": r.key, "out_dir": r.out_dir, "cached": name in cached,
                   "mlflow_run_id": r.mlflow_run_id, "metrics": r.metrics} for name, r in results.items()}


def run_offline(cfg: PipelineConfig, stages: list[str]) -> dict[str, StageResult]:
    """The chosen stages and their upstream, reused from the cache or run, without Prefect or MLflow (for
    benchmarks and tests). Same keys, folders and lock as a flow run, so either reuses the other's outputs."""
    results: dict[str, StageResult] = {}
    wires = wiring(cfg)
    for name in plan(stages, wires):
        spec = STAGES[name]
        inputs = {role: results[stage] for role, stage in wires[name].items()}
        parts = key_parts(spec, cfg, {role: r.key for role, r in inputs.items()})
        out_dir = cfg.workdir_path() / name / parts.key()
        with cache.exclusive(out_dir):
            result = StageResult.load(out_dir)
            if result is None:
                result = spec.module.run(spec.section(cfg), out_dir, inputs=inputs, resolve=cfg.resolve)
                result.key = parts.key()
                result.lineage = chain_lineage(inputs, name, result.key)
                parts.save(out_dir)
                result.save()
        results[name] = result
    return results


def _config_path(path: str) -> str:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    home = os.environ.get("V3FLOW_PROJECT")  # the project folder, for deployments served from elsewhere
    return str(Path(home) / p) if home else str(p)


def _run_name() -> str:
    request = flow_run.parameters.get("request") or {}
    config = request.get("config") if isinstance(request, dict) else getattr(request, "config", "")
    return f"{flow_run.flow_name}-{Path(str(config)).stem or 'default'}"


@flow(name="pipeline", log_prints=True, flow_run_name=_run_name)
def pipeline(request: RunRequest = RunRequest()) -> dict[str, dict]:
    """The whole DeepSeek-V3 recipe, or the chosen stages and what they need."""
    return execute(request)


class StageRequest(BaseModel):
    """Run one stage (upstream stages are reused from the cache, or run when missing)."""

    config: str = Field("configs/tiny.yaml", description="Pipeline config YAML, relative to the project folder.")
    overrides: list[str] = Field(default_factory=list, description="key=value, e.g. data.minhash.bands=20")
    force: bool = Field(False, description="Rerun the stage even when its outputs are cached.")


def _stage(name: str, request: StageRequest) -> dict[str, dict]:
    return execute(RunRequest(config=request.config, overrides=request.overrides, stages=[name],
                              force=[name] if request.force else []))


@flow(name="data", log_prints=True, flow_run_name=_run_name)
def data(request: StageRequest = StageRequest()) -> dict[str, dict]:
    """Data preparation: dedup, tokenizer, packed training sequences."""
    return _stage("data", request)


@flow(name="pretrain", log_prints=True, flow_run_name=_run_name)
def pretrain(request: StageRequest = StageRequest()) -> dict[str, dict]:
    """Pretraining (data is reused from the cache, or prepared first)."""
    return _stage("pretrain", request)


@flow(name="extend", log_prints=True, flow_run_name=_run_name)
def extend(request: StageRequest = StageRequest()) -> dict[str, dict]:
    """Context extension: both YaRN phases and the long-context evaluation, from the newest pretrained model
    of the config (reused from the cache, or trained first)."""
    return execute(RunRequest(config=request.config, overrides=request.overrides, stages=["long_eval"],
                              force=list(EXTENSION_STAGES) if request.force else []))


@flow(name="posttrain", log_prints=True, flow_run_name=_run_name)
def posttrain(request: StageRequest = StageRequest()) -> dict[str, dict]:
    """Post-training: R1-style distillation, SFT, GRPO and the held-out task evaluation, from the newest
    extended model of the config (reused from the cache, or trained first)."""
    return execute(RunRequest(config=request.config, overrides=request.overrides, stages=["task_eval"],
                              force=list(POSTTRAIN_STAGES) if request.force else []))
