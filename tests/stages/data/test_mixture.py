"""Mixture weights up- and down-sample sources in the training split; data/mixtures definitions load."""

from __future__ import annotations

from flows.config import load_config
from stages.data import run
from stages.data.config import SourceConfig
from tests.conftest import MICRO
from tests.stages.data.helpers import write_jsonl


def corpus(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "text": "".join(f"{prefix}_{i}_{j} = compute({j}, {i})\n" for j in range(12))}
            for i in range(n)]


def test_weights_scale_each_source_in_train(tmp_path):
    write_jsonl(tmp_path / "a" / "a.jsonl", corpus("alpha", 200))
    write_jsonl(tmp_path / "b" / "b.jsonl", corpus("beta", 200))
    cfg = load_config(MICRO, ["data.minhash.enabled=false", "data.packing.fim_rate=0"])
    cfg.data.sources = [SourceConfig(name="a", kind="jsonl", path=str(tmp_path / "a"), weight=2.0),
                        SourceConfig(name="b", kind="jsonl", path=str(tmp_path / "b"), weight=0.5)]
    m = run(cfg.data, tmp_path / "out", resolve=cfg.resolve).metrics
    val = m["val_documents"]
    natural_train = 400 - val
    # a's ~190 train documents count twice, b's ~190 about half: ~1.25x the natural count
    assert 1.1 * natural_train < m["train_documents"] < 1.4 * natural_train


def test_mixture_definition_replaces_sources():
    cfg = load_config(MICRO, ["data.mixture=code-and-math"])
    assert [(s.name, s.weight) for s in cfg.data.sources] == [("stdlib", 1.0), ("gsm8k", 2.0)]
    assert cfg.resolve(cfg.data.sources[1].path).is_dir()
