"""A task source (kind: task) puts the worked problems of the post-training task's training split into the
pretraining corpus: never a held-out problem, not clustered away by dedup (its documents share a vocabulary),
and its task pinned to posttrain.task by the config."""

from __future__ import annotations

import random

import pytest

from flows.config import load_config
from stages.data import run
from stages.data.config import SourceConfig
from stages.data.readers import read_documents
from tests.conftest import MICRO
from tests.stages.data.helpers import write_jsonl
from v3flow.errors import ConfigError
from v3flow.tasks import build

SOURCES = "data.sources=[{{name: code, kind: jsonl, path: {path}}}, {{dataset: arithmetic, task: {{train_size: 60}}}}]"


def code(n: int) -> list[dict]:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta", "lambda", "zeta", "rho", "tau"]
    docs = [{"id": f"c{i}", "text": "".join(f"{rng.choice(words)} = {rng.choice(words)}({rng.choice(words)})\n"
                                            for _ in range(40))} for i in range(n)]
    return docs + [dict(docs[0], id="copy")]  # one exact duplicate: dedup still runs on the other sources


def test_task_source_renders_training_problems_only(tmp_path):
    write_jsonl(tmp_path / "code" / "c.jsonl", code(30))
    cfg = load_config(MICRO, [SOURCES.format(path=tmp_path / "code")])
    arithmetic = cfg.data.sources[1]
    assert arithmetic.kind == "task" and not arithmetic.dedup
    assert arithmetic.task == cfg.posttrain.task.model_copy(update={"train_size": 60})  # filled from posttrain

    m = run(cfg.data, tmp_path / "out", resolve=cfg.resolve).metrics
    assert m["docs_read"] == 31 + 6 and m["docs_not_deduplicated"] == 6 and m["exact_duplicates_removed"] == 1
    assert m["docs_after_near_dedup"] == 30 + 6
    docs = [d for d in read_documents(tmp_path / "out" / "work" / "deduped") if d.metadata["source"] == "arithmetic"]
    task = build(arithmetic.task)
    train, held_out = task.problems("train"), task.problems("test")
    text = "\n\n".join(d.text.strip() for d in sorted(docs, key=lambda d: int(d.id.rsplit("-", 1)[1])))
    assert text == "\n\n".join(f"{p.question}\n{p.solution}" for p in train)
    assert not any(p.question in text for p in held_out)
    assert "answer: " in text and "<think>" not in text  # the task's own words, not the R1 format


def test_task_source_must_keep_the_evaluation_task(tmp_path):
    other = SOURCES.format(path=tmp_path).replace("train_size: 60", "train_size: 60, seed: 5")
    with pytest.raises(ConfigError, match="differs from posttrain.task .* held-out problems"):
        load_config(MICRO, [other])
    with pytest.raises(ValueError, match="kind task needs a `task`"):
        SourceConfig(name="t", kind="task")
