"""The `pipeline` flow and one flow per stage, all taking the same request form.

The stage list below is the pipeline: adding a stage is a module under stages/ plus one `StageSpec`
line here (and its three-line flow at the bottom, so it can be deployed on its own).

A request names a config file, overrides and stages. Chosen stages run with the upstream stages they
need: those are reused from the cache when unchanged and run otherwise. Run from Python with
`pipeline(RunRequest(config="configs/tiny.yaml"))` or, as users do, `v3flow run configs/tiny.yaml`.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Literal

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed
from pydantic import BaseModel, Field

from v3flow import cache, registry, report_card, tracking
from v3flow.errors import ConfigError, V3flowError
from flows.config import PipelineConfig, load_config
from flows.runner import StageSpec, end_status, key_parts, run_stage
from v3flow.section import section_hash
from v3flow.stage import StageResult, chain_lineage
from stages import data as data_stage
from stages import distill as distill_stage
from stages import evaluate as evaluate_stage
from stages import extend as extend_stage
from stages import grpo as grpo_stage
from stages import pack as pack_stage
from stages import pretrain as pretrain_stage
from stages import sft as sft_stage
from stages import task_eval as task_eval_stage
from stages.extend import evaluate as long_eval_stage
from stages.pretrain.config import PretrainStageConfig

TRAINING_LIBRARIES = ("torch", "accelerate", "transformers", "safetensors", "numpy")
POSTTRAIN_LIBRARIES = (*TRAINING_LIBRARIES, "trl", "datasets", "tokenizers")
MODEL_STAGES = ("pretrain", "extend_phase1", "extend_phase2", "sft", "grpo")
TRAINING_HEADLINE = ("final_val_loss", "final_val_perplexity", "final_mtp_acceptance_rate", "final_maxvio_mean",
                     "tokens_per_s", "wall_time_s")


def _evaluate_section(cfg: PipelineConfig) -> evaluate_stage.EvaluateConfig:
    """The evaluation settings, and which arm of long_eval and task_eval is which model (from the wiring)."""
    wires = wiring(cfg)
    return evaluate_stage.EvaluateConfig(
        **cfg.evaluation.model_dump(), long_arms={a: s for a, s in wires["long_eval"].items() if s in MODEL_STAGES},
        task_arms={a: s for a, s in wires["task_eval"].items() if s in MODEL_STAGES})


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec("data", data_stage, lambda cfg: cfg.data,
                  libraries=("datatrove", "tokenizers", "transformers", "spacy", "numpy"),
                  headline=("docs_read", "quarantined", "docs_after_filters", "docs_after_exact_dedup", "train_documents",
                            "train_tokens", "throughput_mb_s")),
        StageSpec("pack", pack_stage, lambda cfg: cfg.data.packing, inputs={"corpus": "data"}, libraries=("numpy",),
                  headline=("train_tokens", "train_sequences", "packing_efficiency")),
        StageSpec("pretrain", pretrain_stage, lambda c: PretrainStageConfig(model=c.model, pretrain=c.pretrain),
                  inputs={"data": "pack"}, libraries=TRAINING_LIBRARIES, headline=TRAINING_HEADLINE),
        *[spec for phase, start in (("phase1", "pretrain"), ("phase2", "extend_phase1")) for spec in (
            StageSpec(f"pack_{phase}", pack_stage,
                      lambda c, p=phase: extend_stage.packing(c.data.packing, c.extension, p),
                      inputs={"corpus": "data"}, libraries=("numpy",), headline=("train_tokens", "train_long_share_upsampled")),
            StageSpec(f"extend_{phase}", extend_stage,
                      lambda c, p=phase: extend_stage.section(c.model, c.pretrain, c.extension, p),
                      inputs={"model": start, "data": f"pack_{phase}"}, libraries=TRAINING_LIBRARIES,
                      headline=TRAINING_HEADLINE))],
        StageSpec("long_eval", long_eval_stage, lambda c: long_eval_stage.section(c.data.packing.seq_len, c.extension),
                  inputs={"base": "pretrain", "phase1": "extend_phase1", "phase2": "extend_phase2", "corpus": "data",
                          "short": "pack"}, libraries=(*TRAINING_LIBRARIES, "tokenizers", "matplotlib"),
                  headline=tuple(f"{arm}.{m}" for arm in ("base", "phase1", "phase2") for m in (
                      "passkey_exact_match", "passkey_top1", "short_val_loss", "loss.2048-4096"))
                  + ("short_val_loss_delta",)),
        StageSpec("distill", distill_stage,
                  lambda c: distill_stage.DistillStageConfig(task=c.posttrain.task, distill=c.posttrain.distill),
                  inputs={"model": "extend_phase2"}, libraries=("transformers", "tokenizers", "datasets", "math_verify",
                                                                "openai", "pyarrow"),
                  headline=("acceptance_rate", "rate.wrong_answer", "rate.truncated", "problems_kept", "sft_rows")),
        StageSpec("sft", sft_stage, lambda c: c.posttrain.sft, inputs={"model": "extend_phase2", "data": "distill"},
                  libraries=POSTTRAIN_LIBRARIES,
                  headline=("first_loss", "last_loss", "last_token_accuracy", "steps", "tokens_per_s")),
        StageSpec("grpo", grpo_stage, lambda c: grpo_stage.GrpoStageConfig(task=c.posttrain.task, grpo=c.posttrain.grpo),
                  inputs={"model": "sft"}, libraries=(*POSTTRAIN_LIBRARIES, "math_verify"),
                  headline=tuple(f"{m}_{end}" for m in ("reward", "accuracy", "format", "completion_length", "kl",
                                                        "zero_std_groups") for end in ("first", "last"))),
        StageSpec("task_eval", task_eval_stage,
                  lambda c: task_eval_stage.TaskEvalStageConfig(task=c.posttrain.task, eval=c.posttrain.eval),
                  inputs={"base": "extend_phase2", "sft": "sft", "grpo": "grpo"},
                  libraries=(*TRAINING_LIBRARIES, "tokenizers", "math_verify"),
                  headline=("base.accuracy", "sft.accuracy", "grpo.accuracy", "sft.pass_at_4", "grpo.pass_at_4",
                            "sft.gain_over_base", "grpo.gain_over_sft", "grpo.gain_over_sft_stderr")),
        StageSpec("evaluate", evaluate_stage, _evaluate_section,
                  inputs={**{m: m for m in MODEL_STAGES}, "val": "pack", "long": "long_eval", "tasks": "task_eval"},
                  libraries=TRAINING_LIBRARIES,
                  headline=tuple(f"{m}.{k}" for m in MODEL_STAGES for k in ("val_loss", "mtp_acceptance_rate",
                                                                         "maxvio_mean", "accuracy"))),
    ]
}

EXTENSION_STAGES = ("pack_phase1", "extend_phase1", "pack_phase2", "extend_phase2", "long_eval")
POSTTRAIN_STAGES = ("distill", "sft", "grpo", "task_eval")


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


def execute(request: RunRequest, entry_point: str = "pipeline") -> dict[str, dict]:
    """Validate, then run the planned stages under one MLflow parent run; returns each stage's metrics.

    The parent run is what two pipeline runs are compared by in MLflow: the whole config as params, every
    stage's headline metrics as `<stage>.<metric>`, its key and seconds, and which stages were reused or forced.
    """
    cfg = load_config(_config_path(request.config), request.overrides)
    wires = wiring(cfg)
    order = plan(request.stages, wires)
    force = set((request.stages or order) if request.force else ())
    uri = tracking.tracking_uri(cfg.tracking.tracking_uri)
    source = tracking.source_tags(Path(cfg.project_root or "."), f"v3flow {entry_point} ({cfg.name})")
    run_name = f"{cfg.name} {flow_run.get_name() or 'run'}"
    tags = {
        **source,
        "prefect.flow_run_id": str(flow_run.get_id() or ""),
        "v3flow.config_hash": section_hash(cfg),
        "v3flow.config": cfg.name,
        "v3flow.stages": ",".join(order),
        "v3flow.overrides": " ".join(request.overrides),
        "v3flow.forced": ",".join(n for n in order if n in force),
        "mlflow.note.content": _describe(cfg.name, request, order),
    }
    _close_orphans(uri, cfg.tracking.experiment)
    parent = tracking.start_run(uri, cfg.tracking.experiment, run_name, tags,
                                tracking.flatten(cfg.model_dump(mode="json")))
    tracking.log_text(uri, parent, cfg.model_dump_json(indent=2), "config.json")
    results: dict[str, StageResult] = {}
    cached: set[str] = set()
    registry_cfg = cfg.tracking.registry
    model, versions = registry.model_name(registry_cfg, cfg.name), {}
    try:
        for name in order:
            spec = STAGES[name]
            inputs = {role: results[stage] for role, stage in wires[name].items()}
            start = time.monotonic()
            state = run_stage(spec, cfg, inputs, name in force, parent, uri, source, return_state=True)
            results[name] = result = state.result()
            if state.name == "Cached":
                cached.add(name)
            headline = {m: result.metrics[m] for m in spec.headline if m in result.metrics}
            tracking.log_metrics(uri, parent, {**{f"{name}.{m}": v for m, v in headline.items()},
                                               f"{name}.seconds": time.monotonic() - start})
            registered = registry_cfg.enabled and "hf" in result.outputs and registry.register(
                uri, model, name, result, headline, cfg.name)
            if registered:
                versions[name] = registered
        decision = _champion(uri, model, registry_cfg, wires, results, versions) if registry_cfg.enabled else None
    except BaseException as exc:
        tracking.end_run(uri, parent, end_status(exc))
        raise
    tracking.set_tags(uri, parent, {"v3flow.reused": ",".join(n for n in order if n in cached),
                                    **{f"v3flow.{n}.key": r.key for n, r in results.items()},
                                    **{f"v3flow.{n}.model_version": f"{model}/{v}" for n, v in versions.items()},
                                    **({"v3flow.champion": decision} if decision else {})})
    tracking.end_run(uri, parent)
    _pipeline_artifact(uri, parent)
    return {name: {"key": r.key, "out_dir": r.out_dir, "cached": name in cached,
                   "mlflow_run_id": r.mlflow_run_id, "metrics": r.metrics} for name, r in results.items()}


def _close_orphans(uri: str, experiment: str) -> None:
    """End as KILLED the MLflow runs left RUNNING by a pipeline whose process died without a word (SIGKILL, a lost
    node): their Prefect flow run has ended (Prefect marks it CRASHED), so nothing will ever end them."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    running = tracking.running_runs(uri, experiment)
    ended = set()
    with get_client(sync_client=True) as client:
        for flow_run_id in {r.data.tags.get("prefect.flow_run_id") for r in running} - {None, ""}:
            try:
                if client.read_flow_run(flow_run_id).state.is_final():
                    ended.add(flow_run_id)
            except ObjectNotFound:
                continue
    parents = {r.info.run_id for r in running if r.data.tags.get("prefect.flow_run_id") in ended}
    for run in running:
        if run.info.run_id in parents or run.data.tags.get(tracking.PARENT_TAG) in parents:
            tracking.set_tags(uri, run.info.run_id, {"v3flow.closed_by": "a later pipeline run: its flow run ended "
                                                     "without ending it (process killed)"})
            tracking.end_run(uri, run.info.run_id, "KILLED")


def _champion(uri: str, model: str, cfg: registry.RegistryConfig, wires: dict[str, dict[str, str]],
              results: dict[str, StageResult], versions: dict[str, str]) -> str | None:
    """The champion decision on the evaluator's scores of the models it read (None when it did not run)."""
    evaluation = results.get(cfg.evaluator)
    if evaluation is None:
        return None
    candidates = [registry.Candidate(stage, versions[stage], evaluation.metrics[f"{role}.{cfg.champion_metric}"])
                  for role, stage in wires[cfg.evaluator].items()
                  if stage in versions and f"{role}.{cfg.champion_metric}" in evaluation.metrics]
    return registry.decide_champion(uri, model, candidates, cfg.champion_metric, cfg.greater_is_better,
                                    f"{cfg.evaluator}:{evaluation.key}")


def _describe(config: str, request: RunRequest, order: list[str]) -> str:
    """The parent run's description (MLflow shows it on the run page)."""
    flow_run_url = f"{_prefect_ui()}/runs/flow-run/{flow_run.get_id()}" if flow_run.get_id() else None
    lines = [f"Pipeline run of config **{config}** (`{request.config}`).",
             f"Overrides: {', '.join(f'`{o}`' for o in request.overrides) or 'none'}.",
             f"Stages: {', '.join(order)}; forced: {', '.join(request.stages or order) if request.force else 'none'}."]
    if flow_run_url:
        lines.append(f"Prefect flow run: [{flow_run.get_name()}]({flow_run_url}).")
    return "\n\n".join(lines)


def _prefect_ui() -> str:
    """The Prefect UI's address, from the API URL in effect."""
    from prefect.settings import PREFECT_API_URL

    return (PREFECT_API_URL.value() or "").removesuffix("/api")


def _pipeline_artifact(uri: str, parent: str) -> None:
    """The report card on the parent MLflow run, and the flow run's own Prefect artifacts: the card's tables with
    links to the MLflow parent run and its HTML page (with the figures)."""
    with tempfile.TemporaryDirectory() as tmp:
        card = report_card.publish(uri, parent, Path(tmp))
    link = tracking.run_url(uri, parent)
    create_markdown_artifact(
        markdown=f"[MLflow parent run]({link}), with the full report card (report_card.html, figures included) among "
                 f"its artifacts.\n\n{card.markdown(figures=False)}",
        key="report-card", description="The pipeline run's report card (tables; figures in MLflow)")
    create_link_artifact(link=link, link_text="MLflow: pipeline parent run", key="pipeline-mlflow")


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


@flow(name="stage", log_prints=True)
def stage(request: StageRequest = StageRequest()) -> dict[str, dict]:
    """One stage of the recipe, on the newest outputs of the stages before it."""
    return _run(RunRequest(config=request.config, overrides=request.overrides, stages=[request.stage],
                           force=request.force), f"stage {request.stage}")


def _phase(name: str, stages: tuple[str, ...], request: PhaseRequest) -> dict[str, dict]:
    return _run(RunRequest(config=request.config, overrides=request.overrides, stages=list(stages),
                           force=request.force), name)


@flow(name="extend", log_prints=True)
def extend(request: PhaseRequest = PhaseRequest()) -> dict[str, dict]:
    """Context extension: both YaRN phases and the long-context evaluation, from the newest pretrained model
    of the config (reused from the cache, or trained first)."""
    return _phase("extend", EXTENSION_STAGES, request)


@flow(name="posttrain", log_prints=True)
def posttrain(request: PhaseRequest = PhaseRequest()) -> dict[str, dict]:
    """Post-training: R1-style distillation, SFT, GRPO and the held-out task evaluation, from the newest
    extended model of the config (reused from the cache, or trained first)."""
    return _phase("posttrain", POSTTRAIN_STAGES, request)
