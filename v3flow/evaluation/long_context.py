"""Long-context evaluation: loss by position, and passkey retrieval with a graded score.

Used by context extension (four arms: the pretrained model as it is, with YaRN switched on untrained, after
phase 1, after phase 2) and by the final evaluation stage.

    position_losses   mean next-token loss of held-out long documents in position buckets
                      (0-512, 512-1K, 1-2K, 2-4K at tiny): a model that cannot use positions past its training
                      length gets worse in the late buckets; one that can gets better, since it sees more context
    passkey_prompts   a grid of lengths x depths, `trials` prompts each with a fixed seed: a 5-digit key planted
                      at a depth of real text (held-out documents), asked for at the end. The format is
                      code-native, since the default corpus is Python (the landmark format of YaRN / LongLoRA
                      uses prose filler):  `PASSKEY = 48213  # remember ...` ... `assert PASSKEY == `
    score_passkey     greedy exact match (as YaRN and LongLoRA score it) and, because a 10M-parameter model
                      scores 0 there, the teacher-forced log-probability of the key and its rank among
                      `distractors` random keys of the same token length: rank 1 = the true key is the
                      likeliest; chance is (distractors + 2) / 2
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F

from v3flow.model.transformer import Transformer

INTRO = "# A pass key is hidden in this file. Remember it: it is asked for at the end.\n"
NEEDLE = "PASSKEY = {key}  # remember this pass key\n"
QUESTION = "assert PASSKEY == "


def bucket_edges(short: int, longest: int) -> list[int]:
    """0, short, 2 short, 4 short, ... up to `longest` (e.g. 0, 512, 1024, 2048, 4096)."""
    edges = [0, short]
    while edges[-1] < longest:
        edges.append(min(edges[-1] * 2, longest))
    return edges


def bucket_name(lo: int, hi: int) -> str:
    return f"{lo}-{hi}"


@torch.no_grad()
def position_losses(model: Transformer, documents: list[torch.Tensor], edges: list[int]) -> dict[str, dict]:
    """Per bucket [lo, hi) of target positions: mean next-token loss (nats) and the tokens it averages, over
    the first `edges[-1] + 1` tokens of each document (documents shorter than that are skipped)."""
    length = edges[-1]
    sums, counts = torch.zeros(len(edges) - 1, dtype=torch.float64), torch.zeros(len(edges) - 1, dtype=torch.long)
    device = next(model.parameters()).device
    for doc in documents:
        if len(doc) < length + 1:
            continue
        seq = doc[: length + 1].to(device)
        logits = model(seq[None, :-1])[0]  # [length, vocab]
        nll = F.cross_entropy(logits.float(), seq[1:], reduction="none").double().cpu()
        for i, (lo, hi) in enumerate(pairwise(edges)):
            sums[i] += nll[lo:hi].sum()
            counts[i] += hi - lo
    return {bucket_name(lo, hi): {"loss": float(sums[i] / counts[i]) if counts[i] else math.nan,
                                  "tokens": int(counts[i])}
            for i, (lo, hi) in enumerate(pairwise(edges))}


@dataclass
class PasskeyPrompt:
    length: int  # target prompt length in tokens
    depth: float  # where the needle sits, as a share of the haystack
    trial: int
    key: str
    prompt_ids: list[int]
    key_ids: list[int]
    needle_position: int  # token index of the needle line's first token

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("prompt_ids", "key_ids")} | {
            "prompt_tokens": len(self.prompt_ids)}


def passkey_prompts(tokenizer, haystack: list[str], lengths: list[int], depths: list[float], trials: int,
                    seed: int) -> list[PasskeyPrompt]:
    """The grid of prompts, deterministic in `seed`; a prompt and its key fit in `length` tokens (a few fewer:
    whole lines). `tokenizer` is a `tokenizers.Tokenizer`; `haystack` texts (held-out documents) supply the
    lines around the needle."""
    lines = [line + "\n" for text in haystack for line in text.splitlines() if "PASSKEY" not in line]
    if not lines:
        raise ValueError("passkey: the haystack has no text")
    line_tokens = [len(e.ids) for e in tokenizer.encode_batch(lines, add_special_tokens=False)]
    fixed = len(_ids(tokenizer, INTRO)) + len(_ids(tokenizer, QUESTION)) + len(_ids(tokenizer, NEEDLE.format(key="00000")))
    out = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                rng = random.Random(f"{seed}:{length}:{depth}:{trial}")
                key = str(rng.randint(10000, 99999))
                start, key_ids = rng.randrange(len(lines)), _ids(tokenizer, key)
                budget = length - fixed - len(key_ids)
                while True:  # per-line token counts only approximate the joined text's: shrink until it fits
                    before, text = _haystack(lines, line_tokens, start, budget, depth, key)
                    ids = _ids(tokenizer, text)
                    if len(ids) + len(key_ids) <= length:
                        break
                    budget -= len(ids) + len(key_ids) - length
                out.append(PasskeyPrompt(length, depth, trial, key, ids, key_ids, len(_ids(tokenizer, before))))
    return out


def _haystack(lines: list[str], line_tokens: list[int], start: int, budget: int, depth: float,
              key: str) -> tuple[str, str]:
    """(text before the needle, whole prompt): consecutive lines from `start` within `budget` tokens, the
    needle after the line where `depth` of their tokens is reached."""
    picked, i, total = [], start, 0
    while budget >= line_tokens[i] and len(picked) < len(lines):
        picked.append(i)
        budget -= line_tokens[i]
        total += line_tokens[i]
        i = (i + 1) % len(lines)
    cut, seen = 0, 0
    while cut < len(picked) and seen + line_tokens[picked[cut]] / 2 < depth * total:
        seen += line_tokens[picked[cut]]
        cut += 1
    before = INTRO + "".join(lines[j] for j in picked[:cut])
    return before, before + NEEDLE.format(key=key) + "".join(lines[j] for j in picked[cut:]) + QUESTION


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def _distractors(tokenizer, p: PasskeyPrompt, n: int) -> list[list[int]]:
    """`n` other 5-digit keys with as many tokens as the true one (so all candidates score alike)."""
    rng, found, seen = random.Random(f"distract:{p.key}:{p.length}:{p.trial}"), [], {p.key}
    for _ in range(100 * n):
        if len(found) == n:
            break
        key = str(rng.randint(10000, 99999))
        ids = _ids(tokenizer, key)
        if key not in seen and len(ids) == len(p.key_ids):
            seen.add(key)
            found.append(ids)
    return found


@torch.no_grad()
def score_passkey(model: Transformer, tokenizer, p: PasskeyPrompt, distractors: int = 9, chunk: int = 2048) -> dict:
    """Greedy exact match, and the teacher-forced log-probability and rank of the key against `distractors`
    random keys. The prompt is encoded once into the latent cache, `chunk` tokens at a time (scores of chunk x
    prompt, never prompt x prompt, at 128K), and shared by every candidate."""
    candidates = [p.key_ids, *_distractors(tokenizer, p, distractors)]
    n, P, K = len(candidates), len(p.prompt_ids), len(p.key_ids)
    device = next(model.parameters()).device
    cache = model.new_cache(n, P + K)
    prompt = torch.tensor([p.prompt_ids], device=device)
    for start in range(0, P, chunk):
        hidden = model.hidden_cached(prompt[:, start: start + chunk], cache, start)
    last = model.head(hidden[:, -1]).float()  # [1, V]
    # greedy continuation on row 0
    greedy, logits = [], last
    for i in range(K):
        greedy.append(int(logits.argmax(-1)))
        if i + 1 < K:
            nxt = torch.tensor([[greedy[-1]]], device=device)
            logits = model.head(model.hidden_cached(nxt, cache, P + i)[:, -1]).float()
    # teacher forcing: every row gets the prompt's cache, then its candidate
    for c in cache:
        c.kv[1:, :P], c.pe[1:, :P] = c.kv[:1, :P], c.pe[:1, :P]
    cand = torch.tensor(candidates, device=device)  # [n, K]
    logp = last.log_softmax(-1)[0, cand[:, 0]]
    if K > 1:  # position i of `rest` has read candidate tokens 0..i and predicts token i + 1
        rest = model.head(model.hidden_cached(cand[:, :-1], cache, P)).float().log_softmax(-1)  # [n, K-1, V]
        logp = logp + rest.gather(-1, cand[:, 1:, None])[..., 0].sum(-1)
    rank = 1 + int((logp[1:] > logp[0]).sum())
    return {"exact_match": float(greedy == p.key_ids), "key_logprob": float(logp[0]) / K, "rank": rank,
            "top1": float(rank == 1), "candidates": n, "greedy": tokenizer.decode(greedy)}


def passkey_grid(model: Transformer, tokenizer, prompts: list[PasskeyPrompt], distractors: int = 9) -> list[dict]:
    """One record per prompt: its place in the grid and its scores."""
    model.eval()
    return [{**p.record(), **score_passkey(model, tokenizer, p, distractors)} for p in prompts]


def summarize(records: list[dict]) -> dict[str, float]:
    """Means over the grid: exact match, top-1 rate, rank, key log-probability per token."""
    return {f"passkey_{k}": sum(r[k] for r in records) / len(records)
            for k in ("exact_match", "top1", "rank", "key_logprob")}


def heatmap(records: list[dict], value: str = "rank", title: str = ""):
    """lengths x depths figure of the mean `value` (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    grid = [[_mean(r[value] for r in records if r["length"] == L and r["depth"] == d) for d in depths]
            for L in lengths]
    fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 2, 0.6 * len(lengths) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis_r" if value == "rank" else "viridis")
    ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("prompt tokens")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(im, ax=ax, label=value)
    ax.set_title(title or f"passkey: mean {value}")
    fig.tight_layout()
    return fig


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan
