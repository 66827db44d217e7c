"""What every stage returns: small manifests (paths, hashes, metrics), never tensors or documents.

A finished stage writes its `StageResult` as `result.json` in its content-addressed output folder; that
file is the stage's "done" marker, so a later run with the same key reuses the folder as it is.
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
    report_md: str = ""  # human summary, shown as the stage's Prefect artifact
    mlflow_run_id: str | None = None  # the run that produced it (set by the flow)

    def save(self) -> Path:
        path = Path(self.out_dir) / RESULT_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, out_dir: Path) -> StageResult | None:
        path = Path(out_dir) / RESULT_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))
