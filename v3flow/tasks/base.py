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
    group: str = ""  # the difficulty, as a label to break accuracy down by (e.g. "2 digits")
    level: int = 0  # the difficulty as a number (e.g. operand digits)
    detail: str = ""  # a second breakdown (e.g. "1 carries")


@dataclass(frozen=True)
class Verdict:
    format_ok: bool
    correct: bool
    reason: str  # CORRECT, WRONG, UNPARSED or the format error (v3flow.tasks.reasoning)


class Task(ABC):
    """Subclasses set `name` and `system_prompt` and implement `problems`, `extract`, `equal` and
    `original_answer`."""

    name: str
    system_prompt: str  # asks for R1-style reasoning: the system prompt of the report's R1 form
    trained_levels: range | None = None  # the difficulties training problems have (None: all)

    @abstractmethod
    def problems(self, split: Split) -> list[Problem]: ...

    @abstractmethod
    def extract(self, answer: str) -> str | None:
        """The final answer in the part after `</think>`, normalised; None when there is none or several."""

    @abstractmethod
    def equal(self, predicted: str, gold: str) -> bool: ...

    @abstractmethod
    def original_answer(self, solution: str) -> str | None:
        """The final answer of a solution written in the task's own form (`Problem.solution`'s), normalised as
        `extract` returns it; None when there is none or several."""

    def trained(self, problem: Problem) -> bool:
        """Whether the problem is at a difficulty the training split has (the headline); harder ones are apart."""
        return self.trained_levels is None or problem.level in self.trained_levels

    @staticmethod
    def document(problems: list[Problem]) -> str:
        """Worked problems as the pretraining corpus holds them: question, solution, a blank line between."""
        return "\n\n".join(f"{p.question}\n{p.solution}" for p in problems)

    def few_shot(self, problem: Problem, shots: list[Problem]) -> str:
        """A base model's prompt in its own format (the report scores base models few-shot): worked training
        problems as in the corpus, then the question (no shots: the question alone, a document of one problem)."""
        return f"{self.document(shots)}\n\n{problem.question}\n" if shots else f"{problem.question}\n"

    def judge_original(self, continuation: str, gold: str) -> Verdict:
        """A few-shot continuation judged in the task's own form: up to the first blank line (where the next
        problem would start), its answer as the solutions write it. There is no think block to check."""
        solution = continuation.split("\n\n")[0]
        got = self.original_answer(solution)
        if got is None:
            return Verdict(False, False, UNPARSED)
        ok = self.equal(got, gold)
        return Verdict(True, ok, CORRECT if ok else WRONG)

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
