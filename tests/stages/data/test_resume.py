"""An interrupted data stage resumes: finished datatrove steps are not recomputed, outputs are identical."""

from __future__ import annotations

import json
import shutil

from flows.config import load_config
from stages.data import run
from tests.conftest import MICRO


def test_rerun_after_interruption_resumes_and_matches(tmp_path):
    cfg = load_config(MICRO)
    out = tmp_path / "data"
    first = run(cfg.data, out, resolve=cfg.resolve)
    tokens = json.loads((out / "tokens" / "tokens.json").read_text())
    done = {p: p.stat().st_mtime_ns for p in (out / "datatrove").glob("*/completions/*")}

    # simulate a crash after deduplication: tokenization never finished
    for step in ("tokenize_train", "tokenize_val"):
        shutil.rmtree(out / "datatrove" / step)
    shutil.rmtree(out / "tokens")

    second = run(cfg.data, out, resolve=cfg.resolve)
    for path, mtime in done.items():
        if "tokenize" not in str(path):
            assert path.stat().st_mtime_ns == mtime, f"{path} was recomputed"
    assert json.loads((out / "tokens" / "tokens.json").read_text()) == tokens
    assert second.metrics["tokens"] == first.metrics["tokens"]
