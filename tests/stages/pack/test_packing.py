"""Packing and FIM properties: every token lands in exactly one sequence; FIM keeps every token."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.pack.packing import FimTokens, Packer, apply_fim
from v3flow.corpus import read_ds_documents

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
    from stages.pack.packing import pack_split

    docs = as_docs([[10 + i % 50] * 20 for i in range(2000)])
    ds = tmp_path / "000.ds"
    np.concatenate(docs).astype(np.uint16).tofile(ds)
    np.cumsum([len(d) for d in docs]).astype(np.uint64).tofile(f"{ds}.index")
    assert sum(len(d) for d in read_ds_documents(ds, 2)) == sum(len(d) for d in docs)
    stats = pack_split([ds], 2, Packer(tmp_path / "out", "train", 64, 100, PAD), FIM, 0.1, seed=0)
    assert stats.documents == 2000 and 150 < stats.fim_documents < 250
    assert stats.tokens == sum(len(d) for d in docs) + 3 * stats.fim_documents


def write_ds(path, docs: list[np.ndarray]) -> None:
    np.concatenate(docs).astype(np.uint16).tofile(path)
    np.cumsum([len(d) for d in docs]).astype(np.uint64).tofile(f"{path}.index")


def test_long_documents_are_upsampled_to_their_share(tmp_path):
    """Context extension's data: long documents repeated (whole copies, seeded) until they hold `long_share`
    of the tokens; short ones kept once; the order shuffled; nothing dropped."""
    from stages.pack.packing import upsampled_order

    short, long = as_docs([[11] * 49] * 300), as_docs([[12] * 499] * 6)  # 15,000 short and 3,000 long tokens
    write_ds(tmp_path / "a.ds", short[:150] + long[:3])
    write_ds(tmp_path / "b.ds", short[150:] + long[3:])
    files = [tmp_path / "a.ds", tmp_path / "b.ds"]
    order, info = upsampled_order(files, 0.5, 500, np.random.default_rng(0))
    assert info["long_documents"] == 6 and abs(info["long_share_natural"] - 3000 / 18000) < 1e-9
    assert info["long_repeat"] == 5.0 and info["long_share_upsampled"] == 0.5  # 0.5 x 15,000 / (0.5 x 3,000)
    lengths = {(f, i): (500 if i >= 150 else 50) for f in (0, 1) for i in range(153)}
    assert sorted(set(order)) == sorted(lengths)  # every document at least once
    long_tokens = sum(lengths[d] for d in order if lengths[d] == 500)
    assert long_tokens / sum(lengths[d] for d in order) == 0.5
    assert order != sorted(order)  # shuffled
    assert upsampled_order(files, 0.5, 500, np.random.default_rng(0))[0] == order  # seeded
    # a share below the natural one keeps the corpus as it is
    low, info = upsampled_order(files, 0.05, 500, np.random.default_rng(0))
    assert info["long_repeat"] == 1.0 and sorted(low) == sorted(lengths)
    assert info["long_share_upsampled"] == info["long_share_natural"]


def test_pack_split_with_upsampling_keeps_whole_documents(tmp_path):
    from stages.pack.packing import pack_split

    docs = as_docs([[11] * 29] * 40) + as_docs([[12] * 199] * 2)
    write_ds(tmp_path / "a.ds", docs)
    stats = pack_split([tmp_path / "a.ds"], 2, Packer(tmp_path / "out", "train", 64, 100, PAD), FIM, 0.0, seed=0,
                       long_share=0.5, long_min_tokens=200)
    assert stats.upsampling["long_repeat"] == 3.0 and stats.documents == 40 + 6
    flat = np.concatenate([np.load(tmp_path / "out" / s["path"]).ravel() for s in stats.shards])
    assert (flat == 12).sum() == 6 * 199 and (flat == 11).sum() == 40 * 29
