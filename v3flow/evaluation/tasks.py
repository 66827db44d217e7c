"""Held-out task accuracy of a model: greedy decoding, and pass@k from n seeded samples per problem (R1's
evaluation samples at temperature 0.6, top-p 0.95 and averages; greedy is the deterministic number).

Two forms: `r1` (the chat template with the R1 system prompt: post-trained models) and `few_shot` (worked
training problems as the pretraining corpus holds them, then the question: how the report scores base models,
in the format they were trained on; the continuation is judged up to its first blank line).

Decoding is ours (v3flow/model/generate.py, the latent KV cache) on the standard model artifact, so every model
of the chain is scored by the same code. Prompts of one length are decoded together (no padding).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Literal

import torch

from v3flow.model.generate import sample
from v3flow.model.transformer import Transformer
from v3flow.tasks.base import Problem, Task


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, arXiv 2107.03374)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


Form = Literal["r1", "few_shot"]


def prompt_ids(tokenizer, task: Task, problem: Problem, form: Form, shots: list[Problem]) -> list[int]:
    if form == "r1":
        return tokenizer.apply_chat_template(task.prompt(problem, "r1"), add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    # a document of the corpus starts after an EOS
    return [tokenizer.eos_token_id, *tokenizer(task.few_shot(problem, shots), add_special_tokens=False)["input_ids"]]


def score(model: Transformer, tokenizer, task: Task, problems: list[Problem], samples: int, temperature: float,
          top_p: float, max_new_tokens: int, seed: int, batch_size: int = 64, form: Form = "r1",
          shots: list[Problem] = ()) -> list[dict]:
    """One record per problem: the greedy response and its verdict, and how many of `samples` sampled responses
    are correct."""
    model.eval()
    eos = tokenizer.eos_token_id
    judge = task.judge if form == "r1" else task.judge_original
    prompts = {p.id: prompt_ids(tokenizer, task, p, form, list(shots)) for p in problems}
    by_length: dict[int, list[Problem]] = defaultdict(list)
    for p in problems:
        by_length[len(prompts[p.id])].append(p)
    records = {}
    generator = torch.Generator().manual_seed(seed)
    for length in sorted(by_length):
        group = by_length[length]
        for i in range(0, len(group), batch_size):
            batch = group[i : i + batch_size]
            ids = torch.tensor([prompts[p.id] for p in batch])
            greedy = _responses(sample(model, ids, max_new_tokens, eos_id=eos), length, eos, tokenizer)
            for p, (text, finished, n_tokens) in zip(batch, greedy, strict=True):
                verdict = judge(text, p.answer)
                if form == "few_shot":  # a base model does not stop: its answer ends at the blank line
                    finished = finished or "\n\n" in text
                    n_tokens = len(tokenizer(text.split("\n\n")[0], add_special_tokens=False)["input_ids"])
                records[p.id] = {"id": p.id, "group": p.group, "detail": p.detail, "trained": task.trained(p),
                                 "question": p.question, "gold": p.answer, "form": form,
                                 "response": text, "correct": verdict.correct, "reason": verdict.reason,
                                 "format_ok": verdict.format_ok, "finished": finished, "tokens": n_tokens,
                                 "samples": samples, "samples_correct": 0}
            if samples:
                per_row = max(1, batch_size // samples)
                for j in range(0, len(batch), per_row):
                    chunk = batch[j : j + per_row]
                    rows = ids[j : j + len(chunk)].repeat_interleave(samples, dim=0)
                    out = sample(model, rows, max_new_tokens, temperature, top_p, eos, generator)
                    for r, (text, _, _) in enumerate(_responses(out, length, eos, tokenizer)):
                        p = chunk[r // samples]
                        records[p.id]["samples_correct"] += int(judge(text, p.answer).correct)
    return [records[p.id] for p in problems]


def _responses(out: torch.Tensor, prompt_len: int, eos: int, tokenizer) -> list[tuple[str, bool, int]]:
    result = []
    for row in out[:, prompt_len:].tolist():
        finished = eos in row
        row = row[: row.index(eos)] if finished else row
        result.append((tokenizer.decode(row, skip_special_tokens=False), finished, len(row)))
    return result


def summary(records: list[dict], ks: list[int]) -> dict[str, float]:
    """On the problems at trained difficulties (the headline): greedy accuracy with its standard error, pass@k
    (averaged over problems), format and truncation shares, mean response length. Greedy accuracy per difficulty
    (`accuracy.<group>`, harder ones included: `accuracy_harder` is theirs together) and, on the headline
    problems, per detail (`accuracy.<detail>`, e.g. by carries)."""
    harder = [r for r in records if not r["trained"]]
    records = [r for r in records if r["trained"]]
    n = len(records)
    acc = sum(r["correct"] for r in records) / n
    out = {"accuracy": acc, "accuracy_stderr": math.sqrt(acc * (1 - acc) / n), "problems": n,
           "format_ok": sum(r["format_ok"] for r in records) / n,
           "truncated": sum(not r["finished"] for r in records) / n,
           "mean_tokens": sum(r["tokens"] for r in records) / n}
    for k in ks:
        values = [pass_at_k(r["samples"], r["samples_correct"], k) for r in records if r["samples"] >= k]
        if values:
            mean = sum(values) / len(values)
            out[f"pass_at_{k}"] = mean  # (MLflow metric names cannot hold '@')
            spread = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
            out[f"pass_at_{k}_stderr"] = math.sqrt(spread / len(values))
    if harder:
        out["accuracy_harder"] = sum(r["correct"] for r in harder) / len(harder)
        out["problems_harder"] = len(harder)
    for key, rows in (("group", records + harder), ("detail", records)):
        groups = defaultdict(list)
        for r in rows:
            groups[r[key]].append(r["correct"])
        for g, values in sorted(groups.items()):
            if g:
                out[f"accuracy.{g.replace(' ', '_')}"] = sum(values) / len(values)
    return out
