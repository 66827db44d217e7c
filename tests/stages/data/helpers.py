"""Small corpora for data-stage tests, written as jsonl sources, and a runner for the stage."""

from __future__ import annotations

import json
from pathlib import Path

from flows.config import load_config
from stages.data import run
from stages.data.config import SourceConfig
from tests.conftest import MICRO


def run_on_jsonl(folder: Path, out: Path, overrides: list[str] = ()):
    """Run the data stage, with the micro config's settings, on the jsonl files in `folder`."""
    cfg = load_config(MICRO, list(overrides))
    cfg.data.sources = [SourceConfig(name="t", kind="jsonl", path=str(folder))]
    return run(cfg.data, out, resolve=cfg.resolve)


def write_jsonl(path: Path, records: list) -> None:
    """Write records (dicts as JSON lines; bytes as they are, for malformed input)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.writelines(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in records)
