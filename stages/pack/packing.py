"""Document packing with Fill-in-the-Middle, as DeepSeek-V3 pretrains (report §4.1).

Documents are laid back to back, each followed by EOS, and the stream is cut into fixed-length sequences
with no cross-document attention mask. A share `fim_rate` of documents is rearranged in
Prefix-Suffix-Middle form before packing:

    <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle <｜end▁of▁sentence｜>

The split points are drawn on token boundaries, so a FIM document keeps every one of its tokens (the
reference implementations split characters and re-tokenize, which changes the tokens at the cuts). The
final partial sequence is padded with the pad token, so every token lands in exactly one sequence;
trainers mask the pad positions.

Shards are `.npy` files of uint32 `[sequences, seq_len]`, memory-mappable with
`np.load(path, mmap_mode="r")` (never pickled).

datatrove's DocumentTokenizer writes the inputs: `*.ds` (a flat token stream, each document ending in
EOS) with `*.ds.index` (uint64 end offsets of the documents).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from v3flow.cache import file_sha256
from v3flow.corpus import PackingSettings, read_ds_documents

TOKEN_DTYPE = np.uint32


@dataclass(frozen=True)
class FimTokens:
    begin: int
    hole: int
    end: int
    eos: int


def apply_fim(doc: np.ndarray, fim: FimTokens, rng: np.random.Generator) -> np.ndarray:
    """PSM-rearrange one document; `doc` ends in EOS, which stays the last token."""
    body = doc[:-1] if len(doc) and doc[-1] == fim.eos else doc
    lo, hi = np.sort(rng.integers(0, len(body) + 1, size=2))
    prefix, middle, suffix = body[:lo], body[lo:hi], body[hi:]
    return np.concatenate(
        [[fim.begin], prefix, [fim.hole], suffix, [fim.end], middle, [fim.eos]]
    ).astype(TOKEN_DTYPE)


@dataclass
class PackStats:
    documents: int = 0
    fim_documents: int = 0
    tokens: int = 0  # document tokens incl. EOS and FIM sentinels
    sequences: int = 0
    pad_tokens: int = 0
    shards: list[dict] = field(default_factory=list)
    upsampling: dict = field(default_factory=dict)  # long-document upsampling, when asked for

    @property
    def efficiency(self) -> float:
        """Share of sequence slots holding real tokens (1 - padding)."""
        slots = self.tokens + self.pad_tokens
        return self.tokens / slots if slots else 0.0


class Packer:
    """Streams documents into `[sequences_per_shard, seq_len]` uint32 shards `<prefix>_NNNNN.npy`."""

    def __init__(self, out_dir: Path, prefix: str, seq_len: int, sequences_per_shard: int, pad_id: int):
        self.out_dir, self.prefix, self.seq_len, self.pad_id = out_dir, prefix, seq_len, pad_id
        self.shard_tokens = seq_len * sequences_per_shard
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.stats = PackStats()
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, doc: np.ndarray, fim: bool = False) -> None:
        doc = np.asarray(doc, dtype=TOKEN_DTYPE)
        self.stats.documents += 1
        self.stats.fim_documents += int(fim)
        self.stats.tokens += len(doc)
        self.buffer.append(doc)
        self.buffered += len(doc)
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> PackStats:
        if self.buffered:
            rest = self.buffered
            pad = -rest % self.seq_len
            self.buffer.append(np.full(pad, self.pad_id, dtype=TOKEN_DTYPE))
            self.buffered += pad
            self.stats.pad_tokens += pad
            self._flush(rest + pad)
        return self.stats

    def _flush(self, n: int) -> None:
        stream = np.concatenate(self.buffer)
        chunk, rest = stream[:n], stream[n:]
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)
        path = self.out_dir / f"{self.prefix}_{len(self.stats.shards):05d}.npy"
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, chunk.reshape(-1, self.seq_len).astype(TOKEN_DTYPE))
        tmp.rename(path)
        sequences = n // self.seq_len
        self.stats.sequences += sequences
        self.stats.shards.append({"path": path.name, "sequences": sequences, "sha256": file_sha256(path)})


def pack_split(
    ds_files: list[Path], token_size: int, packer: Packer, fim: FimTokens, fim_rate: float, seed: int,
    long_share: float | None = None, long_min_tokens: int = 0,
) -> PackStats:
    """Pack every document of `ds_files`, FIM-rearranging a `fim_rate` share of them (seeded). With
    `long_share`, documents of at least `long_min_tokens` tokens are repeated until they hold that share of the
    tokens, and all documents are laid out in a seeded random order (so copies of one document land apart)."""
    rng = np.random.default_rng(seed)
    if long_share is None:
        docs: Iterator[np.ndarray] = (doc for ds in ds_files for doc in read_ds_documents(ds, token_size))
    else:
        order, packer.stats.upsampling = upsampled_order(ds_files, long_share, long_min_tokens, rng)
        files = [list(read_ds_documents(ds, token_size)) for ds in ds_files]  # views of memory maps, not copies
        docs = (files[file][index] for file, index in order)
    for doc in docs:
        use_fim = fim_rate > 0 and rng.random() < fim_rate
        packer.add(apply_fim(doc, fim, rng) if use_fim else doc, fim=use_fim)
    return packer.close()


def document_lengths(ds_path: Path) -> np.ndarray:
    """Token count of each document of a datatrove `.ds` file, from its index alone."""
    if ds_path.stat().st_size == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.fromfile(f"{ds_path}.index", dtype=np.uint64).astype(np.int64)
    return np.diff(ends, prepend=0)


def upsampled_order(ds_files: list[Path], long_share: float, long_min_tokens: int,
                    rng: np.random.Generator) -> tuple[list[tuple[int, int]], dict]:
    """(file, document) pairs in a seeded random order, documents of at least `long_min_tokens` tokens repeated
    r times on average (whole copies, the fraction by a seeded draw) so that they hold `long_share` of the
    tokens; r is never below 1 (no document is dropped). Also the numbers that describe it."""
    lengths = [document_lengths(ds) for ds in ds_files]
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    long_tokens = int(all_lengths[all_lengths >= long_min_tokens].sum())
    short_tokens = int(all_lengths.sum()) - long_tokens
    natural = long_tokens / max(long_tokens + short_tokens, 1)
    repeat = max(1.0, long_share * short_tokens / ((1 - long_share) * long_tokens)) if long_tokens else 1.0
    order = []
    for file, lens in enumerate(lengths):
        for index, n in enumerate(lens):
            copies = 1
            if n >= long_min_tokens:
                copies = int(repeat) + int(rng.random() < repeat - int(repeat))
            order.extend([(file, index)] * copies)
    order = [order[i] for i in rng.permutation(len(order))]
    info = {"long_min_tokens": long_min_tokens, "long_documents": int((all_lengths >= long_min_tokens).sum()),
            "long_share_natural": natural, "long_repeat": repeat,
            "long_share_upsampled": long_tokens * repeat / max(long_tokens * repeat + short_tokens, 1)}
    return order, info


def unigram_entropy(shards: list[Path], vocab_size: int, pad_id: int) -> float:
    """Entropy in nats of the unigram token distribution: the loss of a model that ignores context."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for path in shards:
        counts += np.bincount(np.load(path, mmap_mode="r").ravel(), minlength=vocab_size)[:vocab_size]
    counts[pad_id] = 0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def write_manifest(folder: Path, cfg: PackingSettings, splits: dict[str, PackStats], tokens: dict,
                   entropy: float) -> dict:
    """manifest.json of the packed shards; its own sha256 (of the body) is the data lineage id."""
    body = {
        "format": "npy-uint32",
        "seq_len": cfg.seq_len,
        "vocab_size": tokens["vocab_size"],
        "tokenizer_sha256": tokens["tokenizer_sha256"],
        "tokens_sha256": tokens["sha256"],
        "special_tokens": tokens["special_tokens"],
        "fim_rate": cfg.fim_rate,
        "train_unigram_entropy_nats": entropy,
        "splits": {
            split: {"documents": s.documents, "fim_documents": s.fim_documents, "tokens": s.tokens,
                    "pad_tokens": s.pad_tokens, "sequences": s.sequences, "shards": s.shards, **s.upsampling}
            for split, s in splits.items()
        },
    }
    body["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(body, indent=2))
    tmp.rename(folder / "manifest.json")
    return body
