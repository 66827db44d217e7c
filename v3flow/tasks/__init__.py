"""Reasoning tasks for post-training, one module each (nanochat's shape): `arithmetic` (synthetic, offline, the
tiny default) and `gsm8k` (math word problems). A task gives its problems (train / held-out), the answer's
extractor and verifier (`Task.judge`), and through them the rewards (v3flow/tasks/rewards.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from v3flow.tasks.arithmetic import Arithmetic, ArithmeticSettings
from v3flow.tasks.base import Problem, Task, Verdict
from v3flow.tasks.gsm8k import Gsm8k, Gsm8kSettings

__all__ = ["Problem", "Task", "TaskConfig", "Verdict", "build"]

TaskConfig = Annotated[ArithmeticSettings | Gsm8kSettings, Field(discriminator="name")]


def build(settings: ArithmeticSettings | Gsm8kSettings, resolve=Path) -> Task:
    if isinstance(settings, ArithmeticSettings):
        return Arithmetic(settings)
    return Gsm8k(settings, resolve)
