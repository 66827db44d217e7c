"""Runs one stage as a Prefect task: content-addressed caching, retries, MLflow child run, artifacts.

Caching is Marin-style rather than Prefect's result cache: a stage's output folder is
`<workdir>/<stage>/<key>`, where the key hashes the stage's config section, its upstream stages' keys, a
fingerprint of its input files, its code and its libraries' versions (v3flow/cache.py). A folder holding
`result.json` is a finished stage, so the cache survives restarts of the Prefect server and disappears
with the files it describes. Two runs that reach one key never write at once: the second waits for the
first and reuses its result. Prefect still shows a reused stage as `Cached`, with a link to the MLflow run
that produced it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.exceptions import ExternalSignal
from prefect.logging import get_run_logger
from prefect.states import Completed

from v3flow import cache, tracking
from flows.config import PipelineConfig
from v3flow.section import Section
from v3flow.stage import RESULT_FILE, StageResult, chain_lineage


@dataclass(frozen=True)
class StageSpec:
    """A stage of the pipeline: its module (with `run` and optionally `fingerprint`), its config section, its
    inputs by role (role -> the stage that provides it: `{"data": "pack"}`), and the libraries whose versions
    shape its outputs. The module's `run(section, out_dir, inputs={role: StageResult}, resolve)` never
    names an upstream stage, so which stage fills a role is the pipeline's (or the config's) choice."""

    name: str
    module: object
    section: Callable[[PipelineConfig], Section]
    inputs: dict[str, str] = field(default_factory=dict)  # the default wiring; the config's `inputs` may change it
    libraries: tuple[str, ...] = ()
    headline: tuple[str, ...] = ()  # the metrics the pipeline's parent run carries as `<stage>.<metric>`


def key_parts(spec: StageSpec, cfg: PipelineConfig, upstream: dict[str, str],
              locate: cache.Locate = cache.installed) -> cache.KeyParts:
    """What the stage's key hashes, given the key of the result that fills each of its input roles."""
    fingerprint = getattr(spec.module, "fingerprint", None)
    return cache.KeyParts(
        stage=spec.name, config=spec.section(cfg).hashable(), upstream=dict(upstream),
        inputs=fingerprint(spec.section(cfg), cfg.resolve) if fingerprint else "",
        code=cache.code_hashes(spec.module.__name__, locate), libraries=cache.library_versions(spec.libraries))


def stage_key(spec: StageSpec, cfg: PipelineConfig, inputs: dict[str, StageResult]) -> str:
    """The key of `spec` given the results that fill its input roles."""
    return key_parts(spec, cfg, {role: r.key for role, r in inputs.items()}).key()


def dry_run(specs: list[StageSpec], wires: dict[str, dict[str, str]], cfg: PipelineConfig,
            locate: cache.Locate = cache.installed) -> list[dict]:
    """Per stage in order (`wires`: role -> providing stage, per stage): its key, whether it is cached, and for
    a miss what changed since it last ran."""
    keys: dict[str, str] = {}
    out = []
    for spec in specs:
        parts = key_parts(spec, cfg, {role: keys[stage] for role, stage in wires[spec.name].items()}, locate)
        key = keys[spec.name] = parts.key()
        stage_dir = cfg.workdir_path() / spec.name
        cached = (stage_dir / key / RESULT_FILE).is_file()
        last = None if cached else cache.last_finished(stage_dir, RESULT_FILE)
        before = cache.KeyParts.load(last) if last else None
        changes = cache.explain(parts, before) if before else []
        out.append({"stage": spec.name, "key": key, "cached": cached, "out_dir": str(stage_dir / key),
                    "last_run": str(last) if last else None, "changes": changes})
    return out


def _transient(task, task_run, state) -> bool:
    """Retry I/O hiccups (a full disk, a dropped connection), never a bad config or bad data."""
    try:
        state.result()
    except (ConnectionError, TimeoutError, BlockingIOError, InterruptedError):
        return True
    except Exception:  # noqa: BLE001 - any other failure is not worth a retry
        return False
    return False


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient, task_run_name="{spec.name}")
def run_stage(spec: StageSpec, cfg: PipelineConfig, inputs: dict[str, StageResult], force: bool,
              parent_run_id: str, uri: str, source: dict[str, str]):
    """Run (or reuse) one stage; `inputs` maps each of its roles to the result that fills it."""
    log = get_run_logger()
    parts = key_parts(spec, cfg, {role: r.key for role, r in inputs.items()})
    key = parts.key()
    out_dir = cfg.workdir_path() / spec.name / key
    with cache.exclusive(out_dir, lambda: log.info(f"{spec.name}: another run is writing {out_dir}; waiting")):
        return _run_locked(spec, cfg, inputs, force, parent_run_id, uri, source, parts, out_dir)


def _run_locked(spec: StageSpec, cfg: PipelineConfig, inputs: dict[str, StageResult], force: bool,
                parent_run_id: str, uri: str, source: dict[str, str], parts: cache.KeyParts, out_dir: Path):
    log, key = get_run_logger(), parts.key()
    cached = None if force else StageResult.load(out_dir)
    section = spec.section(cfg)
    params = {**tracking.flatten(section.model_dump(mode="json")), "stage_key": key,
              **{f"input.{role}": f"{r.stage}:{r.key}" for role, r in inputs.items()}}
    tags = {**source, "v3flow.stage": spec.name, "v3flow.stage_key": key, "v3flow.cached": str(cached is not None)}

    read = {role: (r.stage, r.key, r.out_dir) for role, r in inputs.items()}
    if cached is not None:
        log.info(f"{spec.name}: inputs unchanged (key {key}), reusing {out_dir}")
        return Completed(name="Cached", message=f"reused {out_dir}",
                         data=_reuse(spec.name, cached, cfg, uri, tags, params, parent_run_id, read))

    if force and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = tracking.start_run(uri, cfg.tracking.experiment, spec.name, tags, params, parent_run_id)
    tracking.log_stage_inputs(uri, run_id, read)
    log.info(f"{spec.name}: running into {out_dir} (MLflow run {run_id})")
    try:
        with tracking.run_env(run_id, uri):
            result = spec.module.run(section, out_dir, inputs=inputs, resolve=cfg.resolve)
    except BaseException as exc:
        tracking.end_run(uri, run_id, end_status(exc))
        raise
    result.key, result.mlflow_run_id = key, run_id
    result.lineage = chain_lineage(inputs, spec.name, key)
    tracking.log_params(uri, run_id, result.params)
    tracking.log_metrics(uri, run_id, result.metrics)
    tracking.log_artifacts(uri, run_id, result.artifacts, artifact_path=spec.name)
    for name, path in result.tables.items():
        tracking.log_table(uri, run_id, json.loads(Path(path).read_text()), name)
    for name, path in result.datasets.items():
        tracking.log_dataset(uri, run_id, path, name, context=spec.name)
    tracking.log_text(uri, run_id, result.report_md, f"{spec.name}/report.md")
    tracking.end_run(uri, run_id)
    parts.save(out_dir)
    result.save()  # last: result.json marks the folder finished
    _artifacts(spec.name, result, uri, run_id)
    return Completed(data=result)


def end_status(exc: BaseException) -> str:
    """MLflow's status for a run that `exc` ended: KILLED when it was cancelled (Prefect's cancel sends SIGTERM,
    which Prefect raises as TerminationSignal) or interrupted, FAILED otherwise."""
    return "KILLED" if isinstance(exc, ExternalSignal | KeyboardInterrupt) else "FAILED"


def _reuse(stage: str, cached: StageResult, cfg: PipelineConfig, uri: str, tags: dict[str, str],
           params: dict[str, str], parent_run_id: str, read: dict[str, tuple[str, str, str]]) -> StageResult:
    """A child run for a stage served from the cache: it carries the producing run's curves (every logged step)
    and links to that run, where the figures, tables and model files are; Prefect's links open the producing
    run. A producing run that this tracking server does not hold (a workdir made elsewhere) leaves the final
    metrics only."""
    source_id = cached.mlflow_run_id
    producer = tracking.find_run(uri, source_id)
    run_id = tracking.start_run(uri, cfg.tracking.experiment, stage, {**tags, "v3flow.source_run_id": source_id or ""},
                                params, parent_run_id)
    tracking.log_stage_inputs(uri, run_id, read)
    if producer:
        tracking.copy_metric_history(uri, source_id, run_id)
        tracking.set_tags(uri, run_id, {"mlflow.note.content": f"Reused from the cache: the run that produced these "
                                        f"outputs, with its figures, tables and files, is [{producer.info.run_name} "
                                        f"({source_id[:8]})]({tracking.run_url(uri, source_id)})."})
    tracking.log_metrics(uri, run_id, cached.metrics)
    tracking.end_run(uri, run_id)
    _artifacts(stage, cached, uri, source_id if producer else run_id, note="reused from cache")
    return cached


def _artifacts(stage: str, result: StageResult, uri: str, run_id: str, note: str = "") -> None:
    link, slug = tracking.run_url(uri, run_id), stage.replace("_", "-")  # Prefect keys: a-z, 0-9 and dashes
    header = f"*{note}: `{result.out_dir}`*\n\n" if note else ""
    create_markdown_artifact(
        markdown=f"{header}{result.report_md}\n\n[MLflow run]({link})", key=f"{slug}-report",
        description=f"{stage} stage: key numbers",
    )
    create_link_artifact(link=link, link_text=f"MLflow: {stage} run", key=f"{slug}-mlflow")
