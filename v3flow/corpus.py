"""The corpus formats that the data stage writes and later stages read, so that no stage imports another.

    tokens/<split>/*.ds     datatrove's DocumentTokenizer output: a flat token stream (uint16 or uint32, as
                            tokens.json's token_size says), each document ending in EOS, with `*.ds.index`
                            (uint64 end offsets of the documents)
    PackingSettings         how the pack stage lays those documents into training sequences (the config's
                            `data.packing`; context extension packs the same corpus at its phases' lengths)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import Field

from v3flow.section import Section


class PackingSettings(Section):
    """How the `pack` stage lays the tokenized documents into training sequences (its own cache key: packing
    at another length reuses the data stage)."""

    seq_len: int = Field(512, ge=8, description="Tokens per training sequence (DeepSeek-V3: 4096).")
    fim_rate: float = Field(0.1, ge=0, le=1, description="Share of documents rearranged as PSM FIM (DeepSeek-V3: 0.1).")
    sequences_per_shard: int = Field(8192, gt=0)
    seed: int = Field(1234, description="Seed of the FIM choices and split points.")
    long_share: float | None = Field(
        None, ge=0, lt=1, description="Upsample training documents of at least long_min_tokens tokens (repeated, "
        "in a shuffled order) until they hold this share of the training tokens (context extension); unset: every "
        "document once, in corpus order.")
    long_min_tokens: int | None = Field(None, gt=0, description="What counts as long (default: seq_len).")


def read_ds_documents(ds_path: Path, token_size: int) -> Iterator[np.ndarray]:
    """Documents of one datatrove `.ds` file, using its `.ds.index` of document end offsets."""
    dtype = np.uint32 if token_size == 4 else np.uint16
    if ds_path.stat().st_size == 0:  # a task whose share of the split was empty
        return
    tokens = np.memmap(ds_path, dtype=dtype, mode="r")
    ends = np.fromfile(f"{ds_path}.index", dtype=np.uint64)
    start = 0
    for end in ends:
        yield tokens[start:int(end)]  # a view; np.asarray(..., TOKEN_DTYPE) where a copy is needed
        start = int(end)
