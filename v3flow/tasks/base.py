"""What a reasoning task is: problems with train and held-out splits, the answer's extractor and verifier, and
the conversations built from them. Distillation verifies with it, SFT and GRPO take their data and rewards
from it, evaluation scores with it: one place knows a task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

from v3flow.tasks.reasoning import parse

Split = Literal["train", "test"]
Form = Literal["r1", "original"]  # the report's two SFT forms (§5.1)

CORRECT, WRONG, UNPARSED = "correct", "wrong_answer", "unparsed_answer"


@dataclass(frozen=True)
class Problem:
    id: str
    question: str  # the user's message
    answer: str  # the gold final answer, written as the task writes answers
    solution: str  # the task's own solution: the report's "original response"
    group: str = ""  # a label to break accuracy down by (e.g. operand digits)


@dataclass(frozen=True)
class Verdict:
    format_ok: bool
    correct: bool
    reason: str  # CORRECT, WRONG, UNPARSED or the format error (v3flow.tasks.reasoning)


class Task(ABC):
    """Subclasses set `name` and `system_prompt` and implement `problems`, `extract` and `equal`."""

    name: str
    system_prompt: str  # asks for R1-style reasoning: the system prompt of the report's R1 form

    @abstractmethod
    def problems(self, split: Split) -> list[Problem]: ...

    @abstractmethod
    def extract(self, answer: str) -> str | None:
        """The final answer in the part after `</think>`, normalised; None when there is none or several."""

    @abstractmethod
    def equal(self, predicted: str, gold: str) -> bool: ...

    def judge(self, response: str, gold: str) -> Verdict:
        parsed = parse(response)
        if not parsed.ok:
            return Verdict(False, False, parsed.error)
        got = self.extract(parsed.answer)
        if got is None:
            return Verdict(True, False, UNPARSED)
        ok = self.equal(got, gold)
        return Verdict(True, ok, CORRECT if ok else WRONG)

    def prompt(self, problem: Problem, form: Form = "r1") -> list[dict[str, str]]:
        """The conversation up to the assistant's turn: the R1 form carries the system prompt."""
        user = {"role": "user", "content": problem.question}
        return [{"role": "system", "content": self.system_prompt}, user] if form == "r1" else [user]
