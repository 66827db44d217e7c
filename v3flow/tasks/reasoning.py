"""The R1 response format: reasoning inside `<think>...</think>` first, then the answer (R1 paper §2.2.1).

`parse` is strict on purpose; every reward and every verification goes through it, so the known format hacks
(several think blocks, an answer smuggled into the reasoning, an empty answer) earn nothing anywhere:

    <think>                         exactly once, and first (only whitespace before it)
    ...reasoning...                 not empty
    </think>                        exactly once
    ...answer...                    not empty
"""

from __future__ import annotations

from dataclasses import dataclass

THINK, END_THINK = "<think>", "</think>"

# Why a response does not follow the format (the `reason` a rejected distillation sample is kept with).
NO_THINK = "no_think_block"
NOT_FIRST = "think_not_first"
SEVERAL = "several_think_blocks"
UNCLOSED = "unclosed_think"
EMPTY_REASONING = "empty_reasoning"
EMPTY_ANSWER = "empty_answer"


@dataclass(frozen=True)
class Parsed:
    reasoning: str
    answer: str
    error: str | None  # None when the format is right

    @property
    def ok(self) -> bool:
        return self.error is None


def parse(response: str) -> Parsed:
    opens, closes = response.count(THINK), response.count(END_THINK)
    if opens == 0:
        return Parsed("", response.strip(), NO_THINK)
    if opens > 1 or closes > 1:
        return Parsed("", "", SEVERAL)
    if closes == 0:
        return Parsed("", "", UNCLOSED)
    head, _, rest = response.partition(THINK)
    reasoning, _, answer = rest.partition(END_THINK)
    if head.strip():
        return Parsed(reasoning.strip(), answer.strip(), NOT_FIRST)
    if not reasoning.strip():
        return Parsed("", answer.strip(), EMPTY_REASONING)
    if not answer.strip():
        return Parsed(reasoning.strip(), "", EMPTY_ANSWER)
    return Parsed(reasoning.strip(), answer.strip(), None)


def respond(reasoning: str, answer: str) -> str:
    """A response in the format: what the oracle teacher and the tests write."""
    return f"{THINK}\n{reasoning.strip()}\n{END_THINK}\n{answer.strip()}"
