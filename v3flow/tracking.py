"""All of v3flow's MLflow calls: one parent run per pipeline run, one nested child run per stage.

We use `MlflowClient` with explicit run ids rather than the fluent API: Prefect runs tasks in worker
threads, and the fluent API's "active run" is thread-local global state (an `end_run` in a nested
context has ended parents before: mlflow #13874). A stage that launches a subprocess (accelerate, trl)
hands it its child run through `MLFLOW_RUN_ID`, which HF's MLflowCallback and accelerate's tracker attach to.
"""

from __future__ import annotations

import os
import re
import subprocess
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LEN = 6000


def tracking_uri(configured: str | None = None) -> str:
    """The tracking URI in effect: MLFLOW_TRACKING_URI, else the config's, else the local server's."""
    from v3flow import servers

    return os.environ.get("MLFLOW_TRACKING_URI") or configured or servers.local_mlflow_uri()


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def experiment_id(c: MlflowClient, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp else c.create_experiment(name)


# MLflow 3 opens an experiment in its GenAI view (traces, judges) unless the link asks for the classic one.
_CLASSIC_VIEW = "?workflowType=machine_learning"


def run_url(uri: str, run_id: str) -> str:
    """Link to a run in the MLflow UI (HTTP tracking servers only; otherwise the run id)."""
    if not uri.startswith("http"):
        return f"mlflow run {run_id} at {uri}"
    c = client(uri)
    exp = c.get_run(run_id).info.experiment_id
    return f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}{_CLASSIC_VIEW}"


def experiment_url(uri: str, name: str) -> str:
    """Link to an experiment's runs table in the MLflow UI (its address alone when it does not exist yet)."""
    exp = client(uri).get_experiment_by_name(name) if uri.startswith("http") else None
    return f"{uri.rstrip('/')}/#/experiments/{exp.experiment_id}{_CLASSIC_VIEW}" if exp else uri


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{'data': {'minhash': {'bands': 14}}} -> {'data.minhash.bands': '14'} (lists by index)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and tree and all(isinstance(v, dict | list) for v in tree):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix.rstrip("."): str(tree)[:MAX_PARAM_LEN]}
    out: dict[str, str] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def source_tags(root: Path, entry_point: str) -> dict[str, str]:
    """MLflow's standard source tags (its UI's Source and Git commit fields) for code run from `root`."""
    tags = {"mlflow.source.type": "JOB", "mlflow.source.name": entry_point}
    for tag, args in (("commit", ("rev-parse", "HEAD")), ("branch", ("rev-parse", "--abbrev-ref", "HEAD")),
                      ("repoURL", ("remote", "get-url", "origin"))):
        if value := _git(root, *args):
            tags[f"mlflow.source.git.{tag}"] = value
    return tags


def start_run(uri: str, experiment: str, name: str, tags: dict[str, str], params: dict[str, str],
              parent_run_id: str | None = None) -> str:
    """Create a RUNNING run (nested under `parent_run_id` when given); returns its id."""
    c = client(uri)
    all_tags = dict(tags)
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = c.create_run(experiment_id(c, experiment), run_name=name, tags=all_tags)
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict[str, str]) -> None:
    items = [Param(k[:250], str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # the REST API takes at most 100 params per batch
        client(uri).log_batch(run_id, params=items[i : i + 100])


_NOT_IN_A_NAME = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_name(name: str) -> str:
    """`name` with the characters MLflow refuses in a metric name (anything but alphanumerics and `_-. :/`)
    replaced by `_`: `tokens_s.transformers[default]` -> `tokens_s.transformers_default_`."""
    return _NOT_IN_A_NAME.sub("_", name)


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time

    now = int(time.time() * 1000)
    items = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client(uri).log_batch(run_id, metrics=items[i : i + 1000])


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifacts(uri: str, run_id: str, paths: list[str], artifact_path: str | None = None) -> None:
    c = client(uri)
    for path in paths:
        if Path(path).is_dir():  # a folder keeps its name under artifact_path
            c.log_artifacts(run_id, path, "/".join(filter(None, [artifact_path, Path(path).name])))
        elif Path(path).is_file():
            c.log_artifact(run_id, path, artifact_path)


def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    client(uri).log_text(run_id, text, name)


def log_table(uri: str, run_id: str, records: list[dict], name: str) -> None:
    """Records (one dict per row) as an MLflow table (`name` ends in .json), shown in the run's artifacts and
    in the evaluation view."""
    columns = list(dict.fromkeys(k for r in records for k in r))
    client(uri).log_table(run_id, {c: [r.get(c) for r in records] for c in columns}, name)


def log_dataset(uri: str, run_id: str, path: str, name: str, context: str) -> str:
    """A parquet file as an MLflow dataset input of the run (name, digest, schema, source path); returns the
    digest."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    dataset = mlflow.data.from_pandas(pd.read_parquet(path), source=str(Path(path).resolve()), name=name)
    tag = InputTag(key="mlflow.data.context", value=context)
    client(uri).log_inputs(run_id, datasets=[DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[tag])])
    return dataset.digest


def log_stage_inputs(uri: str, run_id: str, inputs: dict[str, tuple[str, str, str]]) -> None:
    """The results a stage read, as MLflow dataset inputs of its run: role -> (stage, key, folder), named after the
    stage, with the key as digest and the role as context. MLflow's lineage then reads model -> packed shards
    -> tokenized corpus on the runs themselves."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    if not inputs:
        return
    with warnings.catch_warnings():  # a local path matches MLflow's two registrations of its local-file source
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        datasets = [DatasetInput(dataset=MetaDataset(resolve_dataset_source(folder), name=stage,
                                                     digest=key)._to_mlflow_entity(),
                                 tags=[InputTag(key="mlflow.data.context", value=role)])
                    for role, (stage, key, folder) in inputs.items()]
    client(uri).log_inputs(run_id, datasets=datasets)


def log_figure(uri: str, run_id: str, figure, name: str) -> None:
    client(uri).log_figure(run_id, figure, name)


def copy_metric_history(uri: str, source_run_id: str, run_id: str) -> int:
    """Every metric curve of `source_run_id` (each logged step) into `run_id`; returns how many curves. The curves
    are read concurrently and written 1,000 points to a request (a reused stage has ~100 curves: one request each
    made a cached rerun spend most of its time here)."""
    c = client(uri)
    keys = list(c.get_run(source_run_id).data.metrics)
    with ThreadPoolExecutor(8) as pool:
        histories = pool.map(lambda key: c.get_metric_history(source_run_id, key), keys)
        points = [m for history in histories for m in history]
    for i in range(0, len(points), 1000):
        c.log_batch(run_id, metrics=points[i : i + 1000])
    return len(keys)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status)


@contextmanager
def run_env(run_id: str, uri: str) -> Iterator[None]:
    """Expose a run to subprocesses and library integrations through MLFLOW_RUN_ID / MLFLOW_TRACKING_URI."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI")}
    os.environ.update(MLFLOW_RUN_ID=run_id, MLFLOW_TRACKING_URI=uri)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def running_runs(uri: str, experiment: str) -> list:
    """The runs of `experiment` that MLflow still shows RUNNING."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'") if exp else []


def child_runs(uri: str, parent_run_id: str) -> list:
    c = client(uri)
    parent = c.get_run(parent_run_id)
    return c.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


# The model registry: one registered model per config, a version per model artifact, aliases per stage.


def find_run(uri: str, run_id: str | None):
    """The run `run_id` on this tracking server, or None (no id, or a run another server holds)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client(uri).get_run(run_id)
    except MlflowException:
        return None


def artifact_uri(uri: str, run_id: str | None, path: str) -> str | None:
    """Where `path` lies among `run_id`'s artifacts; None when this tracking server does not hold the run."""
    run = find_run(uri, run_id)
    return f"{run.info.artifact_uri.rstrip('/')}/{path}" if run else None


def model_version_with_tag(uri: str, name: str, key: str, value: str):
    """The version of registered model `name` tagged key=value, or None (the model need not exist)."""
    versions = client(uri).search_model_versions(f"name = '{name}' and tags.`{key}` = '{value}'")
    return versions[0] if versions else None


def register_model_version(uri: str, name: str, source: str, run_id: str, tags: dict[str, str], description: str):
    """A new version of `name` (created when missing) for the model files at `source`, made by `run_id`."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="v3flow models of one pipeline config: a version per model "
                                  "stage, an alias per stage and `champion`.")
    return c.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
                                  description=description)


def model_version_by_alias(uri: str, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client(uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_model_alias(uri: str, name: str, alias: str, version: str) -> None:
    client(uri).set_registered_model_alias(name, alias, version)


def set_model_version_tags(uri: str, name: str, version: str, tags: dict[str, str]) -> None:
    c = client(uri)
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, str(value))


# Reading runs back (the report card is built from what MLflow holds).


def get_run(uri: str, run_id: str):
    return client(uri).get_run(run_id)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(uri).get_metric_history(run_id, key)]


def artifact_paths(uri: str, run_id: str, folder: str) -> list[str]:
    return [a.path for a in client(uri).list_artifacts(run_id, folder)]


def download_artifact(uri: str, run_id: str, path: str, dst: Path) -> Path:
    return Path(client(uri).download_artifacts(run_id, path, str(dst)))
