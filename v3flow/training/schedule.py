"""Training schedules, expressed in tokens so they scale with the run: the report's (§4.2, pretraining) and a
constant one (context extension, §4.3). Both answer the loop's four questions for the next step: its learning
rate, its batch (sequences), the MTP weight lambda and the bias speed gamma; the sequence-wise balance weight
alpha is a constant of each.

The report's shape, as shares of the 14.8T-token run (REFERENCE-DETAIL §3):
    learning rate   linear warmup over 2K steps -> peak until 67.6 % -> cosine to 0.1 x peak at 96.6 %
                    -> 0.1 x peak until 98.9 % -> 0.0332 x peak (7.3e-6 / 2.2e-4) to the end
    batch size      ramps from 3072 to 15360 sequences over the first 3.17 % of tokens
    MTP weight      lambda 0.3, then 0.1 from 67.6 %
    bias speed      gamma 0.001, then 0 for the last 3.38 %
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, model_validator

from v3flow.section import Section


class ScheduleConfig(Section):
    """The report's schedule (pretraining)."""

    kind: Literal["report"] = "report"
    total_tokens: int = Field(14_800_000_000_000, gt=0, description="Tokens of the run (DeepSeek-V3: 14.8T).")
    peak_lr: float = Field(2.2e-4, gt=0)
    warmup_steps: int = Field(2000, ge=0)
    constant_until: float = Field(0.676, ge=0, le=1, description="Share of tokens at peak LR (10T / 14.8T).")
    decay_until: float = Field(0.9662, ge=0, le=1, description="End of the cosine decay (14.3T / 14.8T).")
    decay_to: float = Field(0.1, gt=0, le=1, description="LR after the decay, as a share of the peak.")
    tail_from: float = Field(0.9887, ge=0, le=1, description="Start of the last constant stage (14.633T).")
    tail_lr: float = Field(0.0332, gt=0, le=1, description="LR of the last stage, as a share of the peak.")
    batch_start: int = Field(3072, gt=0, description="Sequences per step at the start of the ramp.")
    batch_end: int = Field(15360, gt=0, description="Sequences per step after the ramp.")
    batch_ramp_until: float = Field(0.0317, ge=0, le=1, description="End of the batch ramp (469B / 14.8T).")
    mtp_weight: float = Field(0.3, ge=0, description="lambda")
    mtp_weight_late: float = Field(0.1, ge=0, description="lambda after constant_until")
    bias_speed: float = Field(0.001, ge=0, description="gamma")
    bias_off_from: float = Field(0.9662, ge=0, le=1, description="gamma is 0 from here (last 500B tokens)")
    balance_alpha: float = Field(0.0001, ge=0, description="alpha of the sequence-wise balance loss")

    @model_validator(mode="after")
    def _ordered(self) -> ScheduleConfig:
        if not self.constant_until <= self.decay_until <= self.tail_from <= 1:
            raise ValueError("schedule shares must satisfy constant_until <= decay_until <= tail_from <= 1")
        if self.batch_start > self.batch_end:
            raise ValueError(f"batch_start={self.batch_start} exceeds batch_end={self.batch_end}")
        return self

    def lr(self, step: int, tokens: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        f = tokens / self.total_tokens
        if f < self.constant_until:
            return self.peak_lr
        if f < self.decay_until:
            t = (f - self.constant_until) / max(self.decay_until - self.constant_until, 1e-12)
            return self.peak_lr * (self.decay_to + (1 - self.decay_to) * 0.5 * (1 + math.cos(math.pi * t)))
        return self.peak_lr * (self.decay_to if f < self.tail_from else self.tail_lr)

    def batch_size(self, tokens: int, multiple: int = 1) -> int:
        """Sequences in the next step, rounded down to a multiple of micro-batch x processes."""
        f = min(tokens / self.total_tokens / self.batch_ramp_until, 1.0) if self.batch_ramp_until else 1.0
        size = self.batch_start + f * (self.batch_end - self.batch_start)
        return max(multiple, int(size) // multiple * multiple)

    def mtp_lambda(self, tokens: int) -> float:
        return self.mtp_weight if tokens / self.total_tokens < self.constant_until else self.mtp_weight_late

    def gamma(self, tokens: int) -> float:
        return self.bias_speed if tokens / self.total_tokens < self.bias_off_from else 0.0


class ConstantSchedule(Section):
    """A constant learning rate after an optional linear warmup, a fixed batch, lambda and gamma: context
    extension's schedule (the report holds 7.3e-6, the last pretraining LR, through both phases)."""

    kind: Literal["constant"] = "constant"
    total_tokens: int = Field(gt=0, description="Tokens of the run: steps x batch x sequence length.")
    peak_lr: float = Field(gt=0, description="The constant learning rate.")
    warmup_steps: int = Field(0, ge=0)
    batch: int = Field(gt=0, description="Sequences per step.")
    mtp_weight: float = Field(ge=0, description="lambda")
    bias_speed: float = Field(ge=0, description="gamma")
    balance_alpha: float = Field(ge=0, description="alpha of the sequence-wise balance loss")

    def lr(self, step: int, tokens: int) -> float:
        return self.peak_lr * (step + 1) / self.warmup_steps if step < self.warmup_steps else self.peak_lr

    def batch_size(self, tokens: int, multiple: int = 1) -> int:
        return max(multiple, self.batch // multiple * multiple)

    def mtp_lambda(self, tokens: int) -> float:
        return self.mtp_weight

    def gamma(self, tokens: int) -> float:
        return self.bias_speed


# Which schedule a recipe trains on; a config that names none gets the report's.
Schedule = Annotated[ScheduleConfig | ConstantSchedule, Field(discriminator="kind")]
