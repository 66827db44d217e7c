"""The data stage on the micro config's real corpus (a slice of the standard library), without Prefect."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.conftest import MICRO
from v3flow.flows.config import load_config
from v3flow.stages.data import run
from v3flow.stages.data.packing import unigram_entropy
from v3flow.stages.data.readers import read_documents
from v3flow.stages.data.steps import split_of


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    cfg = load_config(MICRO)
    out = tmp_path_factory.mktemp("data")
    return cfg, run(cfg.data, out, resolve=cfg.resolve)


def test_manifest_matches_shards(stage):
    cfg, result = stage
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
        assert sum(int((a == eos).sum()) for a in arrays) == info["documents"]
    assert result.metrics["tokens"] == sum(manifest["splits"][s]["tokens"] for s in ("train", "val"))
    assert 0.99 < result.metrics["packing_efficiency"] <= 1.0


def test_tokenizer_is_a_standard_hf_tokenizer(stage):
    cfg, result = stage
    tok = AutoTokenizer.from_pretrained(result.outputs["tokenizer"])
    assert len(tok) == cfg.data.tokenizer.vocab_size
    assert tok.eos_token == "<｜end▁of▁sentence｜>" and tok.bos_token_id == 0
    text = "def add(a, b):\n    return a + b  # naïve 12345\n"
    assert tok.decode(tok(text).input_ids) == text


def test_near_duplicates_found_in_real_corpus(stage):
    _, result = stage
    # the Windows code pages in encodings/ are generated from one template: real near duplicates
    removed = {d.id for d in read_documents(Path(result.out_dir) / "removed_near")}
    assert any(r.startswith("stdlib/encodings/cp12") for r in removed)
    assert result.metrics["near_duplicates_removed"] == len(removed) > 0


def test_splits_are_disjoint_by_document(stage):
    _, result = stage
    m = result.metrics
    assert m["val_documents"] > 0 and m["train_documents"] > m["val_documents"]
    assert split_of("stdlib/json/decoder.py", 0.05, 1) == split_of("stdlib/json/decoder.py", 0.05, 1)


def test_unigram_entropy_is_reported(stage):
    _, result = stage
    manifest = json.loads(Path(result.outputs["manifest"]).read_text())
    shards = [f"{result.outputs['packed']}/{s['path']}" for s in manifest["splits"]["train"]["shards"]]
    h = unigram_entropy(shards, manifest["vocab_size"], manifest["special_tokens"]["pad"])
    assert h == pytest.approx(result.metrics["train_unigram_entropy_nats"])
    assert 3.0 < h < np.log(manifest["vocab_size"])
