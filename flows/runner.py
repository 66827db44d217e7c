"""Runs one stage as a Prefect task: the executor's cache protocol (flows/executor.py), with retries, an MLflow
child run under the pipeline's parent run, and the stage's Prefect artifacts. Prefect shows a reused stage as
`Cached`, with a link to the MLflow run that produced it.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.exceptions import ExternalSignal
from prefect.logging import get_run_logger
from prefect.states import Completed

from flows.executor import Observer, execute_stage
from v3flow import tracking
from v3flow.stage import StageResult, StageSpec, Wiring


def end_status(exc: BaseException) -> str:
    """MLflow's status for a run that `exc` ended: KILLED when it was cancelled (Prefect's cancel sends SIGTERM,
    which Prefect raises as TerminationSignal) or interrupted, FAILED otherwise."""
    return "KILLED" if isinstance(exc, ExternalSignal | KeyboardInterrupt) else "FAILED"


def _transient(task, task_run, state) -> bool:
    """Retry I/O hiccups (a full disk, a dropped connection), never a bad config or bad data."""
    try:
        state.result()
    except (ConnectionError, TimeoutError, BlockingIOError, InterruptedError):
        return True
    except Exception:  # noqa: BLE001 - any other failure is not worth a retry
        return False
    return False


class ChildRun(Observer):
    """The stage's MLflow child run (params: its section and the results it read) and its Prefect artifacts."""

    def __init__(self, spec: StageSpec, cfg, wires: Wiring, inputs: dict[str, StageResult], parent_run_id: str,
                 uri: str, source: dict[str, str]):
        self.log, self.name, self.uri, self.parent, self.experiment = (get_run_logger(), spec.name, uri, parent_run_id,
                                                                       cfg.tracking.experiment)
        self.read = {role: (r.stage, r.key, r.out_dir) for role, r in inputs.items()}
        self.params = {**tracking.flatten(spec.section(cfg, wires).model_dump(mode="json")),
                       **{f"input.{role}": f"{r.stage}:{r.key}" for role, r in inputs.items()}}
        self.tags = {**source, "v3flow.stage": spec.name}
        self.run_id = None

    def _start(self, key: str, cached: bool, extra: dict[str, str] | None = None) -> str:
        tags = {**self.tags, "v3flow.stage_key": key, "v3flow.cached": str(cached), **(extra or {})}
        run_id = tracking.start_run(self.uri, self.experiment, self.name, tags, {**self.params, "stage_key": key},
                                    self.parent)
        tracking.log_stage_inputs(self.uri, run_id, self.read)
        return run_id

    def waiting(self, out_dir: Path) -> None:
        self.log.info(f"{self.name}: another run is writing {out_dir}; waiting")

    @contextmanager
    def running(self, out_dir: Path):
        self.run_id = self._start(out_dir.name, cached=False)
        self.log.info(f"{self.name}: running into {out_dir} (MLflow run {self.run_id})")
        try:
            with tracking.run_env(self.run_id, self.uri):
                yield
        except BaseException as exc:
            tracking.end_run(self.uri, self.run_id, end_status(exc))
            raise

    def finished(self, result: StageResult) -> None:
        uri, run_id = self.uri, self.run_id
        result.mlflow_run_id = run_id
        tracking.log_params(uri, run_id, result.params)
        tracking.log_metrics(uri, run_id, result.metrics)
        tracking.log_artifacts(uri, run_id, result.artifacts, artifact_path=self.name)
        for name, path in result.tables.items():
            tracking.log_table(uri, run_id, json.loads(Path(path).read_text()), name)
        for name, path in result.datasets.items():
            tracking.log_dataset(uri, run_id, path, name, context=self.name)
        tracking.log_text(uri, run_id, result.report_md, f"{self.name}/report.md")
        tracking.end_run(uri, run_id)

    def saved(self, result: StageResult) -> None:
        self._artifacts(result, self.run_id)

    def reused(self, cached: StageResult) -> None:
        """A child run for a stage served from the cache: it carries the producing run's curves (every logged step)
        and links to that run, where the figures, tables and model files are; Prefect's links open the producing
        run. A producing run that this tracking server does not hold (a workdir made elsewhere) leaves the final
        metrics only."""
        self.log.info(f"{self.name}: inputs unchanged (key {cached.key}), reusing {cached.out_dir}")
        source_id = cached.mlflow_run_id
        producer = tracking.find_run(self.uri, source_id)
        run_id = self._start(cached.key, cached=True, extra={"v3flow.source_run_id": source_id or ""})
        if producer:
            tracking.copy_metric_history(self.uri, source_id, run_id)
            note = (f"Reused from the cache: the run that produced these outputs, with its figures, tables and files, "
                    f"is [{producer.info.run_name} ({source_id[:8]})]({tracking.run_url(self.uri, source_id)}).")
            tracking.set_tags(self.uri, run_id, {"mlflow.note.content": note})
        tracking.log_metrics(self.uri, run_id, cached.metrics)
        tracking.end_run(self.uri, run_id)
        self._artifacts(cached, source_id if producer else run_id, note="reused from cache")

    def _artifacts(self, result: StageResult, run_id: str, note: str = "") -> None:
        link, slug = tracking.run_url(self.uri, run_id), self.name.replace("_", "-")  # Prefect keys: a-z, 0-9, -
        header = f"*{note}: `{result.out_dir}`*\n\n" if note else ""
        create_markdown_artifact(markdown=f"{header}{result.report_md}\n\n[MLflow run]({link})", key=f"{slug}-report",
                                 description=f"{self.name} stage: key numbers")
        create_link_artifact(link=link, link_text=f"MLflow: {self.name} run", key=f"{slug}-mlflow")


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient, task_run_name="{spec.name}")
def run_stage(spec: StageSpec, cfg, wires: Wiring, inputs: dict[str, StageResult], force: bool, parent_run_id: str,
              uri: str, source: dict[str, str]):
    """Run (or reuse) one stage; `inputs` maps each of its roles to the result that fills it."""
    result, cached = execute_stage(spec, cfg, wires, inputs, force,
                                   ChildRun(spec, cfg, wires, inputs, parent_run_id, uri, source))
    if cached:
        return Completed(name="Cached", message=f"reused {result.out_dir}", data=result)
    return Completed(data=result)
