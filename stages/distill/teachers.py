"""Teachers: whatever answers a conversation with an R1-style response. Each yields (request, completion) pairs
as they finish, in any order; the stage appends them to a file as they come, so a killed generation resumes.

- `OpenAIClientTeacher`: one request per sample (some servers ignore `n`, e.g. `transformers serve`), in a
  thread pool of `concurrency`, each with its own seed; timeouts and retries are the openai client's.
- `HFTeacher`: transformers' `generate` on a local folder, seeded per batch.
- `Oracle`: the programmatic teacher of the synthetic arithmetic task (see config.OracleTeacher).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

from stages.distill.config import DistillConfig, HFTeacher, OpenAITeacher, OracleTeacher
from v3flow.errors import ConfigError
from v3flow.tasks.arithmetic import Arithmetic, solve
from v3flow.tasks.base import Problem, Task
from v3flow.tasks.reasoning import END_THINK, THINK, respond

STOP, LENGTH = "stop", "length"  # OpenAI's finish reasons


@dataclass(frozen=True)
class Request:
    key: str  # "<problem id>/<sample index>"
    problem: Problem
    messages: list[dict[str, str]]
    seed: int


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # STOP or LENGTH
    tokens: int | None = None  # generated tokens as the teacher counts them (decoded text can re-encode longer)


Generate = Callable[[list[Request]], Iterator[tuple[Request, Completion]]]


def build(cfg: DistillConfig, task: Task, count_tokens: Callable[[str], list[int]], decode, resolve=Path) -> Generate:
    teacher = cfg.teacher
    if isinstance(teacher, OpenAITeacher):
        return OpenAIClientTeacher(teacher, cfg).generate
    if isinstance(teacher, HFTeacher):
        return HFModelTeacher(resolve(teacher.path), cfg).generate
    if not isinstance(task, Arithmetic):
        raise ConfigError(f"posttrain.distill.teacher.kind=oracle writes arithmetic traces only; the task is "
                          f"{task.name}: use an openai or hf teacher")
    return Oracle(teacher, task, cfg.max_tokens, count_tokens, decode).generate


class OpenAIClientTeacher:
    def __init__(self, teacher: OpenAITeacher, cfg: DistillConfig):
        from openai import OpenAI

        self.teacher, self.cfg = teacher, cfg
        self.client = OpenAI(base_url=teacher.base_url, api_key=os.environ.get(teacher.api_key_env) or "none",
                             timeout=teacher.timeout_s, max_retries=teacher.retries)

    def _one(self, request: Request) -> Completion:
        reply = self.client.chat.completions.create(
            model=self.teacher.model, messages=request.messages, temperature=self.cfg.temperature,
            top_p=self.cfg.top_p, max_tokens=self.cfg.max_tokens, seed=request.seed, n=1)
        choice = reply.choices[0]
        message = choice.message
        text = message.content or ""
        # vLLM / SGLang with a reasoning parser return the reasoning apart from the answer
        reasoning = getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None)
        if reasoning:
            text = respond(reasoning, text)
        elif self.teacher.think_prefilled and END_THINK in text and THINK not in text:
            text = f"{THINK}\n{text}"
        usage = getattr(reply, "usage", None)
        return Completion(text, LENGTH if choice.finish_reason == LENGTH else STOP,
                          getattr(usage, "completion_tokens", None))

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Completion]]:
        with ThreadPoolExecutor(self.teacher.concurrency) as pool:
            futures = {pool.submit(self._one, r): r for r in requests}
            for future in as_completed(futures):
                yield futures[future], future.result()


class HFModelTeacher:
    def __init__(self, folder: Path, cfg: DistillConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not (folder / "config.json").is_file():
            raise ConfigError(f"posttrain.distill.teacher.path={folder}: not a Hugging Face model folder")
        self.cfg, self.torch = cfg, torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Completion]]:
        size, tok, eos = self.cfg.teacher.batch_size, self.tokenizer, self.tokenizer.eos_token_id
        for i in range(0, len(requests), size):
            batch = requests[i : i + size]
            enc = tok.apply_chat_template([r.messages for r in batch], add_generation_prompt=True, padding=True,
                                          return_tensors="pt", return_dict=True)
            self.torch.manual_seed(batch[0].seed)
            with self.torch.no_grad():
                out = self.model.generate(**enc, do_sample=self.cfg.temperature > 0, temperature=self.cfg.temperature
                                          or None, top_p=self.cfg.top_p, max_new_tokens=self.cfg.max_tokens,
                                          pad_token_id=tok.pad_token_id, eos_token_id=eos)
            for request, row in zip(batch, out[:, enc["input_ids"].shape[1]:].tolist(), strict=True):
                finished = eos in row
                row = row[: row.index(eos)] if finished else row
                yield request, Completion(tok.decode(row, skip_special_tokens=True), STOP if finished else LENGTH,
                                          len(row))


class Oracle:
    """Correct column-by-column traces in the task's layout; with probability `error_rate` one of: a digit slip
    in one column (caught right away and the column redone, R1's "wait", with probability `self_correct`, else
    carried to a wrong answer), a broken format, or rambling (the last line repeated past the length limit)."""

    def __init__(self, teacher: OracleTeacher, task: Arithmetic, max_tokens: int, count_tokens, decode):
        self.teacher, self.task, self.max_tokens = teacher, task, max_tokens
        self.count_tokens, self.decode = count_tokens, decode

    def respond(self, problem: Problem, rng: random.Random) -> str:
        layout = self.task.layout
        a, op, b = self.task.operands(problem)
        columns, result = solve(a, op, b)
        good = layout.lines(a, op, b)
        if rng.random() >= self.teacher.error_rate:
            return respond("\n".join(good), problem.answer)
        mistake = rng.choices(["slip", "format", "ramble"], weights=[0.6, 0.2, 0.2])[0]
        if mistake == "format":
            text = "\n".join(good)
            return rng.choice([f"{text}\n{END_THINK}\n{problem.answer}",  # no <think>
                               f"{THINK}\n{text}\n{problem.answer}",  # never closed
                               f"{respond(text, '')}\n{respond('check', problem.answer)}"])  # two blocks
        if mistake == "ramble":
            return respond("\n".join([*good, *[good[-1]] * rng.randint(20, 60)]), problem.answer)
        j = rng.randrange(len(columns))
        wrong_digit = (columns[j].digit + rng.randint(1, 9)) % 10
        slipped = layout.line(op, replace(columns[j], digit=wrong_digit), len(columns))
        if rng.random() < self.teacher.self_correct:
            return respond("\n".join([*good[:j], slipped, f"wait, {good[j]}", *good[j + 1:]]), problem.answer)
        wrong = result + (wrong_digit - columns[j].digit) * 10 ** j
        lines = [*good[:j], slipped, *good[j + 1:len(columns)], *layout.check(a, op, b, wrong)]
        return respond("\n".join(lines), layout.answer(a, op, b, wrong))

    def generate(self, requests: list[Request]) -> Iterator[tuple[Request, Completion]]:
        for request in requests:
            text = self.respond(request.problem, random.Random(request.seed))
            ids = self.count_tokens(text)
            if len(ids) > self.max_tokens:  # as a server would: cut at the generation limit
                yield request, Completion(self.decode(ids[: self.max_tokens]), LENGTH, self.max_tokens)
            else:
                yield request, Completion(text, STOP, len(ids))
