from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """Our BPE (v3flow's pre-tokenizer and special tokens) trained on a slice of the standard library."""
    from transformers import AutoTokenizer

    from stages.data import bpe

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    tok = bpe.train_bpe((f.read_text(errors="ignore") for f in files), vocab_size=1024, min_frequency=2,
                        max_chars=400_000)
    folder = tmp_path_factory.mktemp("tokenizer")
    bpe.save_tokenizer(tok, folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def digit_tokenizer(tmp_path_factory):
    """The same BPE with every digit its own pre-token (data.tokenizer.digits_per_token: 1)."""
    from transformers import AutoTokenizer

    from stages.data import bpe

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    tok = bpe.train_bpe((f.read_text(errors="ignore") for f in files), vocab_size=1024, min_frequency=2,
                        max_chars=400_000, digits_per_token=1)
    folder = tmp_path_factory.mktemp("digit-tokenizer")
    bpe.save_tokenizer(tok, folder)
    return AutoTokenizer.from_pretrained(folder)
