"""The pack stage on the micro corpus: shards match the manifest, every token is packed once, and packing at
another length reuses the data stage (its key does not change)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows.config import load_config
from flows.executor import dry_run, run_offline
from flows.recipe import wiring
from stages.pack.packing import unigram_entropy
from tests.conftest import MICRO


@pytest.fixture(scope="module")
def packed(micro_workdir):
    cfg = load_config(MICRO, [f"workdir={micro_workdir}"])
    return cfg, run_offline(cfg, ["pack"])


def test_manifest_matches_shards(packed):
    cfg, results = packed
    result, corpus = results["pack"], results["data"]
    manifest = json.loads(Path(result.outputs["manifest"]).read_text())
    assert manifest["seq_len"] == cfg.data.packing.seq_len and manifest["format"] == "npy-uint32"
    for split in ("train", "val"):
        info = manifest["splits"][split]
        arrays = [np.load(f"{result.outputs['packed']}/{s['path']}", mmap_mode="r") for s in info["shards"]]
        assert sum(a.shape[0] for a in arrays) == info["sequences"] > 0
        assert all(a.dtype == np.uint32 and a.shape[1] == manifest["seq_len"] for a in arrays)
        pad = manifest["special_tokens"]["pad"]
        assert sum(int((a != pad).sum()) for a in arrays) == info["tokens"]
        eos = manifest["special_tokens"]["eos"]
        assert sum(int((a == eos).sum()) for a in arrays) == info["documents"] == corpus.metrics[f"{split}_documents"]
        # every document token is packed once; FIM adds three sentinels per rearranged document
        assert info["tokens"] == corpus.metrics[f"{split}_tokens"] + 3 * info["fim_documents"]
    assert result.metrics["tokens"] == sum(manifest["splits"][s]["tokens"] for s in ("train", "val"))
    assert 0.99 < result.metrics["packing_efficiency"] <= 1.0
    assert (Path(result.outputs["tokenizer"]) / "tokenizer.json").read_bytes() == (
        Path(corpus.outputs["tokenizer"]) / "tokenizer.json").read_bytes()
    assert result.lineage == {"data": corpus.key, "pack": result.key}


def test_unigram_entropy_is_reported(packed):
    _, results = packed
    result = results["pack"]
    manifest = json.loads(Path(result.outputs["manifest"]).read_text())
    shards = [f"{result.outputs['packed']}/{s['path']}" for s in manifest["splits"]["train"]["shards"]]
    h = unigram_entropy(shards, manifest["vocab_size"], manifest["special_tokens"]["pad"])
    assert h == pytest.approx(result.metrics["train_unigram_entropy_nats"])
    assert 3.0 < h < np.log(manifest["vocab_size"])


def test_packing_at_another_length_reuses_the_corpus(packed):
    cfg, results = packed
    longer = load_config(MICRO, [f"workdir={cfg.workdir}", "data.packing.seq_len=256", "model.max_seq_len=256",
                                 "extension.yarn.original_seq_len=256", "extension.phase1.seq_len=512",
                                 "extension.phase2.seq_len=1024"])
    plan = {r["stage"]: r for r in dry_run(["data", "pack"], wiring(longer), longer)}
    assert plan["data"]["cached"] and plan["data"]["key"] == results["data"].key
    assert not plan["pack"]["cached"] and "config seq_len: 128 -> 256" in plan["pack"]["changes"]
    again = run_offline(longer, ["pack"])
    assert again["data"].key == results["data"].key and again["pack"].metrics["seq_len"] == 256
    shard = np.load(next(Path(again["pack"].outputs["packed"]).glob("train_*.npy")), mmap_mode="r")
    assert shard.shape[1] == 256
