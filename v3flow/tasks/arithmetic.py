"""Synthetic multi-digit addition and subtraction with a column-by-column scratchpad: the offline task that a
10M-parameter model learns on a CPU (Lee et al., "Teaching Arithmetic to Small Transformers", arXiv 2307.03381:
the layout of the digits decides whether a small transformer learns arithmetic at all).

Two layouts (`layout`), the same problems:

`aligned` (the default): operands zero-padded to one width, one line per column from the ones, each line the
same length, the answer zero-padded too, so every digit the model writes depends on digits at fixed distances
behind it. It needs one token per digit (`data.tokenizer.digits_per_token: 1`, checked):

    What is 47+85?
    <think>
    7+5+0=12            column: digit + digit + carry in = carry out, digit
    4+8+1=13
    </think>
    132

`columns`: the harder variant. Digits spaced (one token each under any tokenizer), operands unaligned, and
a `check` line that needs a multi-digit subtraction done without working:

    What is 3 4 7 + 2 8 5 ?
    <think>
    7 + 5 = 1 2
    4 + 8 + 1 = 1 3
    3 + 2 + 1 = 6
    check : 6 3 2 - 2 8 5 = 3 4 7
    </think>
    6 3 2

Subtraction keeps a >= b (no negative results); `aligned` writes the borrow where addition writes the carry
(`4-8-0=16`: borrow 1, digit 6). The task's own solution (the report's "original response", and the pretraining
corpus's worked problems: data/datasets/arithmetic.yaml) is the scratchpad without the tags, ending
`answer: ...`.

Difficulty is the number of digits of the larger operand. Held-out problems are drawn first, per difficulty
(`test_size` each, at most a fifth of what exists at that difficulty), so the training split never changes
them; training problems have `min_digits`..`max_digits`, the held-out split also `test_extra_digits` harder
levels, reported apart. Problems are deterministic from the seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from v3flow.section import Section
from v3flow.tasks.base import Problem, Split, Task

SYSTEM_PROMPT = "Reason in <think> </think> column by column from the ones, then answer."
HELD_OUT_SHARE = 5  # at most 1/5 of the problems of a difficulty are held out


class ArithmeticSettings(Section):
    name: Literal["arithmetic"] = "arithmetic"
    layout: Literal["aligned", "columns"] = Field(
        "aligned", description="aligned: zero-padded operands, fixed-length column lines (needs one token per digit); "
        "columns: spaced digits, unaligned, with a check line (harder).")
    operations: list[Literal["+", "-"]] = Field(default_factory=lambda: ["+", "-"])
    min_digits: int = Field(1, ge=1, le=9, description="Fewest digits of an operand in training problems.")
    max_digits: int = Field(3, ge=1, le=9, description="The difficulty knob: most digits of a training operand.")
    test_extra_digits: int = Field(1, ge=0, le=3, description="Held-out problems also have operands this many "
                                   "digits longer than any training one (reported apart).")
    train_size: int = Field(20000, gt=0, description="Training problems (distillation, GRPO prompts, corpus).")
    test_size: int = Field(1000, gt=0, description="Held-out problems per difficulty (at most a fifth of the "
                           "distinct problems of that difficulty).")
    seed: int = 0

    @model_validator(mode="after")
    def _digits(self) -> ArithmeticSettings:
        if self.min_digits > self.max_digits:
            raise ValueError(f"posttrain.task.min_digits={self.min_digits} exceeds max_digits={self.max_digits}")
        if self.max_digits + self.test_extra_digits > 9:
            raise ValueError("posttrain.task: max_digits + test_extra_digits must stay <= 9")
        trained = range(self.min_digits, self.max_digits + 1)
        left = sum(capacity(d, self.operations) - held_out(d, self.operations, self.test_size) for d in trained)
        if self.train_size > left // 2:
            raise ValueError(f"posttrain.task.train_size={self.train_size}: too many distinct problems for "
                             f"{self.min_digits}..{self.max_digits}-digit operands ({left:,} are left outside the "
                             f"held-out ones; at most half of them, {left // 2:,}, can be drawn); lower train_size "
                             "or test_size, or raise max_digits")
        return self


def capacity(digits: int, operations: list[str]) -> int:
    """Distinct problems whose larger operand has exactly `digits` digits (subtraction: a >= b)."""
    pairs = 10 ** (2 * digits) - (10 ** (2 * digits - 2) if digits > 1 else 0)
    return sum(pairs if op == "+" else pairs // 2 for op in operations)


def held_out(digits: int, operations: list[str], test_size: int) -> int:
    return min(test_size, capacity(digits, operations) // HELD_OUT_SHARE)


@dataclass(frozen=True)
class Column:
    top: int  # digit of a
    bottom: int  # digit of b
    carry_in: int  # carry (addition) or borrow (subtraction) from the column before
    carry_out: int
    digit: int  # the result's digit


def solve(a: int, op: str, b: int) -> tuple[list[Column], int]:
    """The columns, ones first, and the result."""
    da, db = str(a)[::-1], str(b)[::-1]
    columns, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry if op == "+" else x - y - carry
        out = total // 10 if op == "+" else int(total < 0)
        columns.append(Column(x, y, carry, out, total - 10 * out if op == "+" else total + 10 * out))
        carry = out
    return columns, (a + b if op == "+" else a - b)


def spell(n: int) -> str:
    """342 -> '3 4 2': one token per digit under any tokenizer (the columns layout)."""
    return " ".join(str(n)) if n >= 0 else "- " + " ".join(str(-n))


class Layout:
    """How a problem and its solution are written."""

    def question(self, a: int, op: str, b: int) -> str: ...
    def operands(self, question: str) -> tuple[int, str, int]: ...
    def line(self, op: str, c: Column, width: int) -> str: ...
    def answer(self, a: int, op: str, b: int, result: int) -> str: ...
    def check(self, a: int, op: str, b: int, result: int) -> list[str]:
        """Lines after the columns that check `result` (none by default)."""
        return []

    def lines(self, a: int, op: str, b: int) -> list[str]:
        columns, result = solve(a, op, b)
        width = len(columns)
        return [self.line(op, c, width) for c in columns] + self.check(a, op, b, result)

    def number(self, text: str) -> int | None:
        """The answer as a number, or None when it is not one number written as this layout writes numbers."""


class Aligned(Layout):
    _QUESTION = re.compile(r"What is (\d+)([+-])(\d+)\?")

    @staticmethod
    def width(a: int, b: int) -> int:
        return max(len(str(a)), len(str(b)))

    def question(self, a, op, b):
        w = self.width(a, b)
        return f"What is {a:0{w}d}{op}{b:0{w}d}?"

    def operands(self, question):
        a, op, b = self._QUESTION.fullmatch(question).groups()
        return int(a), op, int(b)

    def line(self, op, c, width):
        return f"{c.top}{op}{c.bottom}{op}{c.carry_in}={c.carry_out}{c.digit}"

    def answer(self, a, op, b, result):
        return f"{result:0{self.width(a, b) + (op == '+')}d}"

    def number(self, text):
        return int(text) if re.fullmatch(r"\d+", text) else None


class Spaced(Layout):
    """The `columns` layout."""

    _QUESTION = re.compile(r"What is ([\d ]+) ([+-]) ([\d ]+) \?")

    def question(self, a, op, b):
        return f"What is {spell(a)} {op} {spell(b)} ?"

    def operands(self, question):
        a, op, b = self._QUESTION.fullmatch(question).groups()
        return int(a.replace(" ", "")), op, int(b.replace(" ", ""))

    def line(self, op, c, width):
        if op == "+":
            return f"{c.top} + {c.bottom}" + (f" + {c.carry_in}" if c.carry_in else "") + \
                f" = {spell(c.digit + 10 * c.carry_out)}"
        minuend = c.top + 10 * c.carry_out
        return f"{spell(minuend)} - {c.bottom}" + (f" - {c.carry_in}" if c.carry_in else "") + f" = {c.digit}"

    def answer(self, a, op, b, result):
        return spell(result)

    def check(self, a, op, b, result):
        inverse = f"{spell(result)} - {spell(b)} = {spell(result - b)}" if op == "+" else \
            f"{spell(result)} + {spell(b)} = {spell(result + b)}"
        return [f"check : {inverse}"]

    def number(self, text):
        text = " ".join(text.split())
        return int(text.replace(" ", "")) if re.fullmatch(r"-?\d( \d)*", text) else None


LAYOUTS: dict[str, Layout] = {"aligned": Aligned(), "columns": Spaced()}


def carries(a: int, op: str, b: int) -> int:
    """Columns that carry (addition) or borrow (subtraction): the breakdown that shows what a model gets wrong."""
    return sum(c.carry_out for c in solve(a, op, b)[0])


class Arithmetic(Task):
    name = "arithmetic"
    system_prompt = SYSTEM_PROMPT
    answer_marker = "answer: "

    def __init__(self, settings: ArithmeticSettings):
        self.settings = settings
        self.layout = LAYOUTS[settings.layout]
        self._splits: dict[str, list[Problem]] | None = None

    @property
    def trained_levels(self) -> range:
        return range(self.settings.min_digits, self.settings.max_digits + 1)

    def problems(self, split: Split) -> list[Problem]:
        if self._splits is None:
            self._splits = self._generate()
        return self._splits[split]

    def _generate(self) -> dict[str, list[Problem]]:
        s = self.settings
        rng = random.Random(f"arithmetic-{s.seed}")
        test: dict[tuple, Problem] = {}
        for digits in range(s.min_digits, s.max_digits + s.test_extra_digits + 1):
            want = held_out(digits, s.operations, s.test_size)
            level: dict[tuple, Problem] = {}
            while len(level) < want:  # drawn first, so the train split never changes the held-out one
                key = self._draw(rng, digits)
                level.setdefault(key, self._problem(key, f"test-{len(test) + len(level)}"))
            test.update(level)
        train: dict[tuple, Problem] = {}  # at most half of what is left (the settings' check)
        while len(train) < s.train_size:
            key = self._draw(rng, rng.randint(s.min_digits, s.max_digits))
            if key not in test and key not in train:
                train[key] = self._problem(key, f"train-{len(train)}")
        return {"train": list(train.values()), "test": list(test.values())}

    def _draw(self, rng: random.Random, digits: int) -> tuple[int, str, int]:
        """Two operands of at most `digits` digits, the larger with exactly `digits`."""
        low = 10 ** (digits - 1) if digits > 1 else 0
        while True:
            x, y = rng.randrange(10**digits), rng.randrange(10**digits)
            if max(x, y) >= low:
                break
        op = rng.choice(self.settings.operations)
        return (max(x, y), op, min(x, y)) if op == "-" else (x, op, y)

    def _problem(self, key: tuple[int, str, int], pid: str) -> Problem:
        a, op, b = key
        result = a + b if op == "+" else a - b
        answer = self.layout.answer(a, op, b, result)
        digits = len(str(max(a, b)))
        return Problem(id=pid, question=self.layout.question(a, op, b), answer=answer,
                       solution="\n".join([*self.layout.lines(a, op, b), f"{self.answer_marker}{answer}"]),
                       group=f"{digits} digits", level=digits, detail=f"{carries(a, op, b)} carries")

    def operands(self, problem: Problem) -> tuple[int, str, int]:
        return self.layout.operands(problem.question)

    def extract(self, answer: str) -> str | None:
        """Only a number written as the layout writes numbers, and nothing else: no list of guesses, no prose."""
        text = " ".join(answer.split())
        return text if self.layout.number(text) is not None else None

    def equal(self, predicted: str, gold: str) -> bool:
        return self.layout.number(predicted) == self.layout.number(gold)

    def original_answer(self, solution: str) -> str | None:
        """The answer of a solution in the task's own form: its one `answer: ` line."""
        found = [line[len(self.answer_marker):] for line in solution.splitlines()
                 if line.startswith(self.answer_marker)]
        return self.extract(found[0]) if len(found) == 1 else None
