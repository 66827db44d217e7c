"""Packed training sequences in a deterministic order, addressable by position (for exact resume).

The order of an epoch is a permutation seeded by (seed, epoch); a position counts the sequences consumed
by all processes together, so a run resumed at position p reads exactly what the interrupted run would
have read, and a two-process run reads the same global batches as a one-process run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from v3flow.model.transformer import IGNORE, documents


class PackedSequences:
    def __init__(self, manifest: Path, split: str):
        info = json.loads(Path(manifest).read_text())
        self.seq_len, self.pad_id, self.eos_id = (info["seq_len"], info["special_tokens"]["pad"],
                                                  info["special_tokens"]["eos"])
        folder = Path(manifest).parent
        self.shards = [np.load(folder / s["path"], mmap_mode="r") for s in info["splits"][split]["shards"]]
        self.ends = np.cumsum([len(s) for s in self.shards])
        self.size = int(self.ends[-1]) if len(self.ends) else 0
        if self.size == 0:
            raise ValueError(f"{manifest}: the {split} split has no sequences")

    def rows(self, indices: np.ndarray) -> torch.Tensor:
        """Sequences by global index -> int64 [len(indices), seq_len]."""
        shard = np.searchsorted(self.ends, indices, side="right")
        starts = np.concatenate([[0], self.ends[:-1]])
        out = np.stack([self.shards[s][i - starts[s]] for s, i in zip(shard, indices)])
        return torch.from_numpy(out.astype(np.int64))

    def order(self, epoch: int, seed: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(self.size)

    def batch(self, position: int, count: int, seed: int) -> torch.Tensor:
        """`count` sequences starting at global position `position` of the seeded epoch orders."""
        picked, pos = [], position
        while len(picked) < count:
            epoch, offset = divmod(pos, self.size)
            take = min(count - len(picked), self.size - offset)
            picked.extend(self.order(epoch, seed)[offset:offset + take])
            pos += take
        return self.rows(np.asarray(picked))

    def inputs_targets(self, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token pairs; padding positions carry no loss."""
        targets = seqs[:, 1:].clone()
        targets[targets == self.pad_id] = IGNORE
        return seqs[:, :-1], targets

    def documents(self, inputs: torch.Tensor) -> torch.Tensor:
        """The document index of every input token (each packed document ends with EOS)."""
        return documents(inputs, self.eos_id)
