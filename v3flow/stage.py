"""What a stage is (`StageSpec`, declared once in its module) and what every stage returns (`StageResult`: small
manifests, paths, hashes and metrics, never tensors or documents).

A finished stage writes its `StageResult` as `result.json` in its content-addressed output folder; that
file is the stage's "done" marker, so a later run with the same key reuses the folder as it is. Paths in
it are stored relative to the folder, so a workdir copied to another machine (a GPU box) or mounted
elsewhere still resolves.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from v3flow.section import Section

RESULT_FILE = "result.json"


@dataclass
class StageResult:
    stage: str
    key: str  # content address: config section hash + upstream keys + input fingerprints
    out_dir: str
    outputs: dict[str, str] = field(default_factory=dict)  # name -> path (files or folders)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # extra lineage params (hashes of inputs/outputs)
    artifacts: list[str] = field(default_factory=list)  # files worth logging to MLflow
    tables: dict[str, str] = field(default_factory=dict)  # MLflow table name -> JSON file of records
    datasets: dict[str, str] = field(default_factory=dict)  # MLflow dataset input name -> parquet file
    report_md: str = ""  # human summary, shown as the stage's Prefect artifact
    mlflow_run_id: str | None = None  # the run that produced it (set by the flow)
    lineage: dict[str, str] = field(default_factory=dict)  # stage -> key, for it and every stage up its chain

    def save(self) -> Path:
        root = Path(self.out_dir)
        record = asdict(self)
        record["out_dir"] = "."
        record["outputs"] = {k: _relative(v, root) for k, v in self.outputs.items()}
        record["artifacts"] = [_relative(v, root) for v in self.artifacts]
        record["tables"] = {k: _relative(v, root) for k, v in self.tables.items()}
        record["datasets"] = {k: _relative(v, root) for k, v in self.datasets.items()}
        path = root / RESULT_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, out_dir: Path) -> StageResult | None:
        """The finished result in `out_dir`, its paths resolved against where the folder is now."""
        root = Path(out_dir).resolve()
        path = root / RESULT_FILE
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        record.setdefault("lineage", {record["stage"]: record["key"]})
        record["out_dir"] = str(root)
        record["outputs"] = {k: str(root / v) for k, v in record["outputs"].items()}
        record["artifacts"] = [str(root / v) for v in record["artifacts"]]
        record["tables"] = {k: str(root / v) for k, v in record.get("tables", {}).items()}
        record["datasets"] = {k: str(root / v) for k, v in record.get("datasets", {}).items()}
        return cls(**record)


def _relative(path: str, root: Path) -> str:
    """`path` relative to the stage folder (absolute when it lies outside it)."""
    p = Path(path)
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(p)


def chain_lineage(inputs: dict[str, StageResult], stage: str, key: str) -> dict[str, str]:
    """stage -> key for `stage` and every stage up its chain (through the results it reads)."""
    return {**{s: k for r in inputs.values() for s, k in r.lineage.items()}, stage: key}


class Wiring(NamedTuple):
    """What a stage's section may read besides the config: which stage fills each input role of each stage, and
    which stages make models."""

    inputs: dict[str, dict[str, str]]
    models: tuple[str, ...]


@dataclass(frozen=True)
class StageSpec:
    """A stage, declared once in its own module; the pipeline (flows/recipe.py lists the specs), its config,
    the Prefect forms and deployments, the report card, the registry and the tests derive from these.

    `module` has `run(section, out_dir, inputs={role: StageResult}, resolve) -> StageResult` and optionally
    `fingerprint(section, resolve)` (input files outside the workdir); `run` never names an upstream stage, so
    which stage fills a role is the pipeline's (or the config's `inputs`) choice."""

    name: str  # its folder <workdir>/<name>/<key>, MLflow run, Prefect task and deployment stage/<name>
    module: str  # the module that runs it; its code (and what it imports) is part of the key
    section: Callable[[Any, Wiring], Section]  # its config section, from the pipeline config and the wiring
    settings: dict[str, Any] = field(default_factory=dict)  # YAML sections it reads: path -> schema, or
    # (schema, default factory; ... when the section must be written)
    inputs: dict[str, str] | Callable[[list[StageSpec]], dict[str, str]] = field(default_factory=dict)  # role ->
    # the stage that fills it by default (a function of the stages before it, where that depends on them)
    libraries: tuple[str, ...] = ()  # whose versions shape its outputs (part of the key)
    headline: tuple[str, ...] | Callable[[Wiring], tuple[str, ...]] = ()  # metrics the pipeline's parent run
    # carries as `<stage>.<metric>` (a function of the wiring, where they name the models it reads)
    model: bool = False  # writes the standard model artifact: registered, and measured by the evaluation
    phase: str = ""  # the phase flow that runs it with its upstream (extend, posttrain)
    curves: tuple[str, ...] = ()  # metric histories drawn on the report card's training curves
    report: tuple[str, ...] = ()  # report-card blocks about it (v3flow/report_card.py BLOCKS)
    checks: tuple[Callable[[Any], None], ...] = ()  # checks across sections; raise ValueError naming the keys
    expand: Callable[[dict, Path, Path], None] | None = None  # rewrites the raw YAML (root, path) before validation

    def default_inputs(self, earlier: list[StageSpec]) -> dict[str, str]:
        return dict(self.inputs(earlier) if callable(self.inputs) else self.inputs)

    def headline_for(self, wiring: Wiring) -> tuple[str, ...]:
        return self.headline(wiring) if callable(self.headline) else self.headline

    def runner(self):
        return importlib.import_module(self.module)
