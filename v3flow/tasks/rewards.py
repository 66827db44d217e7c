"""Rule-based rewards (R1: accuracy and format, no reward model), as TRL calls them:
`reward(completions, **dataset_columns) -> list[float]`, named `<what>_reward`, picked by name and weight from
the config (`posttrain.grpo.rewards`). Both judge through the strict R1 format parser, so a response earns an
accuracy reward only with exactly one think block first and a non-empty answer that is the gold answer as a
whole (never as a substring of a longer answer).
"""

from __future__ import annotations

from collections.abc import Callable

from v3flow.tasks.base import Task
from v3flow.tasks.reasoning import parse

Reward = Callable[..., list[float]]


def text_of(completion) -> str:
    """TRL passes strings for text prompts and message lists for conversations."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def format_reward(completions: list, **_) -> list[float]:
    """1 when the response is `<think>reasoning</think>answer` with each tag exactly once, else 0."""
    return [float(parse(text_of(c)).ok) for c in completions]


def accuracy_reward(completions: list, answer: list[str], task: Task, **_) -> list[float]:
    """1 when the final answer verifies against the gold `answer` (a dataset column), else 0."""
    return [float(task.judge(text_of(c), gold).correct) for c, gold in zip(completions, answer, strict=True)]


def overlong_reward(completions: list, completion_ids: list[list[int]], max_length: int, buffer: int,
                    **_) -> list[float]:
    """DAPO's soft overlong punishment (arXiv 2503.14476): 0 up to max_length - buffer tokens, then falling
    linearly to -1 at max_length, so that the length limit is felt before completions are cut."""
    start = max_length - buffer
    return [0.0 if len(ids) <= start else -min(1.0, (len(ids) - start) / max(buffer, 1)) for ids in completion_ids]


REWARDS: dict[str, Reward] = {"accuracy": accuracy_reward, "format": format_reward, "overlong": overlong_reward}


def bind(names: list[str], task: Task, max_length: int = 0, buffer: int = 0) -> list[Reward]:
    """The configured rewards with the task (and the length limit) bound, named as TRL logs them
    (rewards/<name>_reward/mean)."""
    out = []
    for name in names:
        fn = REWARDS[name]

        def reward(completions: list, _fn=fn, **kwargs) -> list[float]:
            return _fn(completions, task=task, max_length=max_length, buffer=buffer, **kwargs)

        reward.__name__ = fn.__name__
        out.append(reward)
    return out
