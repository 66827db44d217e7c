"""Decoding with the latent KV cache: greedy, and self-speculative with the MTP module (report §5.4.3).

Speculative decoding with D = 1: after the main model has produced token t_{n}, the MTP module drafts
t_{n+1} from the main model's last hidden state and Emb(t_n). One main forward pass over [t_n, draft]
then yields the true t_{n+1} and, when it equals the draft, t_{n+2} as well: one or two tokens per main
pass. Output is exactly the main model's greedy output; the acceptance rate measures the drafter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from v3flow.model.transformer import Transformer


@torch.no_grad()
def greedy(model: Transformer, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """prompt [B, P] -> [B, P + new_tokens], one cached forward pass per token."""
    B, P = prompt.shape
    cache = model.new_cache(B, P + new_tokens)
    out = prompt
    logits = model.head(model.hidden_cached(prompt, cache, 0)[:, -1])
    for i in range(new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
        if i + 1 < new_tokens:
            logits = model.head(model.hidden_cached(nxt, cache, P + i)[:, -1])
    return out


@torch.no_grad()
def sample(model: Transformer, prompt: torch.Tensor, new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
           eos_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """prompt [B, P] (same length) -> [B, P + n] with n <= new_tokens: greedy at temperature 0, else sampled with
    nucleus (top-p) truncation; stops early once every row has produced `eos_id` (later tokens are eos)."""
    B, P = prompt.shape
    cache = model.new_cache(B, P + new_tokens)
    out, done = prompt, torch.zeros(B, dtype=torch.bool)
    logits = model.head(model.hidden_cached(prompt, cache, 0)[:, -1])
    for i in range(new_tokens):
        nxt = _pick(logits.float(), temperature, top_p, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        out = torch.cat([out, nxt[:, None]], dim=1)
        if i + 1 == new_tokens or bool(done.all()):
            break
        logits = model.head(model.hidden_cached(nxt[:, None], cache, P + i)[:, -1])
    return out


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(outside, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)[:, 0]


@dataclass
class SpeculativeStats:
    drafted: int = 0
    accepted: int = 0
    main_passes: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / max(self.main_passes, 1)


class _Drafter:
    """The MTP module run incrementally: position i consumes (h_i, t_{i+1}) and drafts t_{i+2}."""

    def __init__(self, model: Transformer, cache):
        self.model, self.cache, self.pos = model, cache, 0

    def draft(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """hidden [1, S, D] of positions pos..pos+S-1 and the tokens after them [1, S] -> draft [1, 1]."""
        m, s = self.model, hidden.shape[1]
        cos, sin = m.cos[self.pos:self.pos + s], m.sin[self.pos:self.pos + s]
        h = m.mtp[0].forward_cached(hidden, m.embed(next_tokens), cos, sin, self.cache, self.pos)
        self.pos += s
        return m.head(m.mtp[0].norm(h[:, -1:])).argmax(-1)


@torch.no_grad()
def speculative(model: Transformer, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy decoding of one sequence (prompt [1, P]) with MTP drafts; returns tokens and statistics."""
    if not len(model.mtp):
        raise ValueError("speculative decoding needs a model with an MTP module (mtp_depth >= 1)")
    P = prompt.shape[1]
    caches = model.new_cache(1, P + new_tokens + 2)
    main, drafter = caches[: model.cfg.n_layers], _Drafter(model, caches[-1])
    stats = SpeculativeStats()
    h = model.hidden_cached(prompt, main, 0)  # positions 0..P-1
    stats.main_passes += 1
    tokens = torch.cat([prompt, model.head(h[:, -1:]).argmax(-1)], dim=1)  # + t_P
    draft = drafter.draft(h, tokens[:, 1:])  # drafts t_{P+1}
    n = P  # the main cache holds positions < n; tokens[:, n] is known, not yet fed
    while tokens.shape[1] < P + new_tokens:
        h = model.hidden_cached(torch.cat([tokens[:, n:n + 1], draft], dim=1), main, n)
        stats.main_passes += 1
        stats.drafted += 1
        predicted = model.head(h).argmax(-1)  # [1, 2]: t_{n+1}, and t_{n+2} if the draft was right
        if torch.equal(predicted[:, :1], draft):
            stats.accepted += 1
            tokens = torch.cat([tokens, predicted], dim=1)
            draft = drafter.draft(h, tokens[:, n + 1:n + 3])
            n += 2
        else:
            tokens = torch.cat([tokens, predicted[:, :1]], dim=1)
            draft = drafter.draft(h[:, :1], tokens[:, n + 1:n + 2])
            n += 1
    tokens = tokens[:, : P + new_tokens]
    stats.tokens = tokens.shape[1] - P
    return tokens, stats


def acceptance_summary(runs: list[SpeculativeStats]) -> dict[str, float]:
    """Pooled draft acceptance over several prompts, with the standard error of that ratio taking each
    prompt as a cluster: the drafts of one greedy continuation are far from independent (a continuation
    that loops accepts every draft), so a binomial error over drafts would be too small."""
    n, drafted, accepted = len(runs), sum(r.drafted for r in runs), sum(r.accepted for r in runs)
    rate = accepted / drafted if drafted else float("nan")
    spread = sum((r.accepted - rate * r.drafted) ** 2 for r in runs) / (n * (n - 1)) if n > 1 else float("nan")
    return {"mtp_acceptance_rate": rate, "mtp_acceptance_stderr": math.sqrt(spread) / (drafted / n) if drafted
            else float("nan"), "mtp_drafted_tokens": drafted, "mtp_prompts": n,
            "mtp_tokens_per_pass": sum(r.tokens for r in runs) / max(sum(r.main_passes for r in runs), 1)}
