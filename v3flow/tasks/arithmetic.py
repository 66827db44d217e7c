"""Synthetic multi-digit addition and subtraction with a column-by-column scratchpad: the offline task that a
10M-parameter model learns on a CPU (Lee et al., "Teaching Arithmetic to Small Transformers", arXiv 2307.03381:
scratchpads make small models learn arithmetic).

Every digit is written on its own, separated by spaces, so that each is one token under our tokenizer (its
pre-tokenizer would group up to three digits into one token). A problem and its worked solution:

    What is 3 4 7 + 2 8 5 ?
    <think>
    7 + 5 = 1 2           ones first; the sum's first digit is the carry of the next column
    4 + 8 + 1 = 1 3
    3 + 2 + 1 = 6
    check : 6 3 2 - 2 8 5 = 3 4 7
    </think>
    6 3 2

The task's own solution (the report's "original response", and the pretraining corpus's worked problems:
data/datasets/arithmetic.yaml) is the same scratchpad without the tags, ending `answer : 6 3 2`.

Subtraction keeps a >= b (no negative results); a column that borrows writes its minuend with the borrowed 1
in front (`1 4 - 8 = 6`) and the next column subtracts it (`3 - 2 - 1 = 0`). Problems are deterministic from
the seed. Train operands have `min_digits`..`max_digits` digits; the held-out split has the same lengths plus
`test_extra_digits` longer ones, never a train problem, so accuracy by length shows what was learned.
"""

from __future__ import annotations

import random
import re
from typing import Literal

from pydantic import Field, model_validator

from v3flow.section import Section
from v3flow.tasks.base import Problem, Split, Task

SYSTEM_PROMPT = "Reason in <think> </think> column by column from the ones, check, then answer."
_ANSWER = re.compile(r"-?\d( \d)*")


class ArithmeticSettings(Section):
    name: Literal["arithmetic"] = "arithmetic"
    operations: list[Literal["+", "-"]] = Field(default_factory=lambda: ["+", "-"])
    min_digits: int = Field(1, ge=1, le=9, description="Fewest digits of an operand in training problems.")
    max_digits: int = Field(3, ge=1, le=9, description="The difficulty knob: most digits of a training operand.")
    test_extra_digits: int = Field(1, ge=0, le=3, description="Held-out problems also have operands this many "
                                   "digits longer than any training one.")
    train_size: int = Field(20000, gt=0, description="Training problems (distillation, GRPO prompts).")
    test_size: int = Field(500, gt=0, description="Held-out problems (evaluation).")
    seed: int = 0

    @model_validator(mode="after")
    def _digits(self) -> ArithmeticSettings:
        if self.min_digits > self.max_digits:
            raise ValueError(f"posttrain.task.min_digits={self.min_digits} exceeds max_digits={self.max_digits}")
        if self.max_digits + self.test_extra_digits > 9:
            raise ValueError("posttrain.task: max_digits + test_extra_digits must stay <= 9")
        return self


def spell(n: int) -> str:
    """342 -> '3 4 2': one token per digit."""
    return " ".join(str(n)) if n >= 0 else "- " + " ".join(str(-n))


def solve(a: int, op: str, b: int) -> tuple[list[str], int]:
    """The scratchpad's column lines (ones first) and the result."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry, digits = [], 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        if op == "+":
            total = x + y + carry
            lines.append(f"{x} + {y}" + (f" + {carry}" if carry else "") + f" = {spell(total)}")
            digits.append(total % 10)
            carry = total // 10
        else:
            borrow_in, minuend = carry, x
            carry = int(x - y - borrow_in < 0)
            minuend = x + 10 * carry
            lines.append(f"{spell(minuend)} - {y}" + (f" - {borrow_in}" if borrow_in else "")
                         + f" = {minuend - y - borrow_in}")
            digits.append(minuend - y - borrow_in)
    if op == "+" and carry:
        digits.append(carry)
    result = int("".join(map(str, reversed(digits))))
    return lines, result


def scratchpad(a: int, op: str, b: int, result: int | None = None) -> str:
    """The reasoning of a correct solution; with `result`, the check of that (possibly wrong) result."""
    lines, true = solve(a, op, b)
    got = true if result is None else result
    inverse = f"{spell(got)} - {spell(b)} = {spell(got - b)}" if op == "+" else f"{spell(got)} + {spell(b)} = " \
        f"{spell(got + b)}"
    return "\n".join([*lines, f"check : {inverse}"])


class Arithmetic(Task):
    name = "arithmetic"
    system_prompt = SYSTEM_PROMPT

    def __init__(self, settings: ArithmeticSettings):
        self.settings = settings
        self._splits: dict[str, list[Problem]] | None = None

    def problems(self, split: Split) -> list[Problem]:
        if self._splits is None:
            self._splits = self._generate()
        return self._splits[split]

    def _generate(self) -> dict[str, list[Problem]]:
        s = self.settings
        rng = random.Random(f"arithmetic-{s.seed}")
        test_lengths = range(s.min_digits, s.max_digits + s.test_extra_digits + 1)
        test: dict[tuple, Problem] = {}
        while len(test) < s.test_size:  # drawn first, so the train split never changes the held-out one
            key = self._draw(rng, rng.choice(test_lengths))
            test.setdefault(key, self._problem(key, f"test-{len(test)}"))
        train: dict[tuple, Problem] = {}
        capacity = sum(len(s.operations) * 10 ** (2 * d) for d in range(s.min_digits, s.max_digits + 1))
        if s.train_size > capacity // 2:
            raise ValueError(f"posttrain.task.train_size={s.train_size}: too many distinct problems for "
                             f"{s.min_digits}..{s.max_digits}-digit operands; raise max_digits")
        misses = 0
        while len(train) < s.train_size:
            key = self._draw(rng, rng.randint(s.min_digits, s.max_digits))
            if key in test or key in train:
                misses += 1
                if misses > 100 * s.train_size:  # the held-out split took most of the small operands
                    raise ValueError(f"posttrain.task.train_size={s.train_size}: only {len(train)} distinct "
                                     f"{s.min_digits}..{s.max_digits}-digit problems are left outside the "
                                     f"{s.test_size} held-out ones; lower train_size or test_size, or raise max_digits")
                continue
            train[key] = self._problem(key, f"train-{len(train)}")
        return {"train": list(train.values()), "test": list(test.values())}

    def _draw(self, rng: random.Random, digits: int) -> tuple[int, str, int]:
        a = self._number(rng, digits)
        b = self._number(rng, rng.randint(min(self.settings.min_digits, digits), digits))
        op = rng.choice(self.settings.operations)
        return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)

    @staticmethod
    def _number(rng: random.Random, digits: int) -> int:
        return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)

    @staticmethod
    def _problem(key: tuple[int, str, int], pid: str) -> Problem:
        a, op, b = key
        result = a + b if op == "+" else a - b
        return Problem(id=pid, question=f"What is {spell(a)} {op} {spell(b)} ?", answer=spell(result),
                       solution=f"{scratchpad(a, op, b)}\nanswer : {spell(result)}", group=f"{len(str(a))} digits")

    @staticmethod
    def operands(problem: Problem) -> tuple[int, str, int]:
        a, op, b = re.fullmatch(r"What is ([\d ]+) ([+-]) ([\d ]+) \?", problem.question).groups()
        return int(a.replace(" ", "")), op, int(b.replace(" ", ""))

    def extract(self, answer: str) -> str | None:
        """Only a number written digit by digit, and nothing else: no list of guesses, no prose."""
        text = " ".join(answer.split())
        return text if _ANSWER.fullmatch(text) else None

    def equal(self, predicted: str, gold: str) -> bool:
        return int(predicted.replace(" ", "")) == int(gold.replace(" ", ""))
