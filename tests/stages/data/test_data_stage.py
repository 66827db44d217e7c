"""The data stage on the micro config's real corpus (a slice of the standard library), without Prefect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from flows.config import load_config
from stages.data import run
from stages.data.readers import read_documents
from stages.data.steps import split_of
from tests.conftest import MICRO
from v3flow.corpus import read_ds_documents


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    cfg = load_config(MICRO)
    out = tmp_path_factory.mktemp("data")
    return cfg, run(cfg.data, out, resolve=cfg.resolve)


def test_token_files_match_their_counts(stage):
    cfg, result = stage
    info = json.loads((Path(result.outputs["tokens"]) / "tokens.json").read_text())
    assert info["token_size"] == 2 and info["vocab_size"] == cfg.data.tokenizer.vocab_size
    eos = info["special_tokens"]["eos"]
    for split, counts in info["splits"].items():
        files = sorted((Path(result.outputs["tokens"]) / counts["path"]).glob("*.ds"))
        docs = [d for f in files for d in read_ds_documents(f, info["token_size"])]
        assert len(docs) == counts["documents"] == result.metrics[f"{split}_documents"] > 0
        assert sum(len(d) for d in docs) == counts["tokens"] == result.metrics[f"{split}_tokens"]
        assert all(d[-1] == eos and eos not in d[:-1] for d in docs)  # one EOS, at the end of each document


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
