"""What every stage returns: small manifests (paths, hashes, metrics), never tensors or documents.

A finished stage writes its `StageResult` as `result.json` in its content-addressed output folder; that
file is the stage's "done" marker, so a later run with the same key reuses the folder as it is. Paths in
it are stored relative to the folder, so a workdir copied to another machine (a GPU box) or mounted
elsewhere still resolves.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
