"""Packing and FIM properties: every token lands in exactly one sequence; FIM keeps every token."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from v3flow.stages.pack.packing import FimTokens, Packer, apply_fim, read_ds_documents

EOS, PAD = 1, 2
FIM = FimTokens(begin=4, hole=3, end=5, eos=EOS)
docs_strategy = st.lists(st.lists(st.integers(10, 500), min_size=0, max_size=60), min_size=1, max_size=30)


def as_docs(raw: list[list[int]]) -> list[np.ndarray]:
    return [np.array(d + [EOS], dtype=np.uint32) for d in raw]


@settings(max_examples=60, deadline=None)
@given(raw=docs_strategy, seq_len=st.integers(8, 64), per_shard=st.integers(1, 5))
def test_every_token_lands_in_exactly_one_sequence(tmp_path_factory, raw, seq_len, per_shard):
    out = tmp_path_factory.mktemp("pack")
    packer = Packer(out, "train", seq_len, per_shard, PAD)
    docs = as_docs(raw)
    for d in docs:
        packer.add(d)
    stats = packer.close()
    shards = [np.load(out / s["path"]) for s in stats.shards]
    assert all(s.dtype == np.uint32 and s.shape[1] == seq_len for s in shards)
    flat = np.concatenate([s.ravel() for s in shards])
    stream = np.concatenate(docs)
    # the packed stream is the documents back to back, each ending in EOS, then padding to a full sequence
    assert np.array_equal(flat[: len(stream)], stream)
    assert np.all(flat[len(stream):] == PAD) and len(flat) - len(stream) < seq_len
    assert stats.tokens == len(stream) and stats.sequences * seq_len == len(flat)
    assert (flat == EOS).sum() == len(docs)


@settings(max_examples=200, deadline=None)
@given(doc=st.lists(st.integers(10, 500), min_size=0, max_size=80), seed=st.integers(0, 2**32 - 1))
def test_fim_keeps_every_token_in_psm_order(doc, seed):
    original = np.array(doc + [EOS], dtype=np.uint32)
    out = apply_fim(original, FIM, np.random.default_rng(seed))
    assert len(out) == len(original) + 3
    assert out[0] == FIM.begin and out[-1] == EOS
    hole, end = int(np.where(out == FIM.hole)[0][0]), int(np.where(out == FIM.end)[0][0])
    prefix, suffix, middle = out[1:hole], out[hole + 1:end], out[end + 1:-1]
    assert np.array_equal(np.concatenate([prefix, middle, suffix]), original[:-1])


def test_fim_rate_is_respected(tmp_path):
    from v3flow.stages.pack.packing import pack_split

    docs = as_docs([[10 + i % 50] * 20 for i in range(2000)])
    ds = tmp_path / "000.ds"
    np.concatenate(docs).astype(np.uint16).tofile(ds)
    np.cumsum([len(d) for d in docs]).astype(np.uint64).tofile(f"{ds}.index")
    assert sum(len(d) for d in read_ds_documents(ds, 2)) == sum(len(d) for d in docs)
    stats = pack_split([ds], 2, Packer(tmp_path / "out", "train", 64, 100, PAD), FIM, 0.1, seed=0)
    assert stats.documents == 2000 and 150 < stats.fim_documents < 250
    assert stats.tokens == sum(len(d) for d in docs) + 3 * stats.fim_documents
