"""Config of the GRPO stage (report §5.2; DeepSeekMath §4.1 for what the report leaves out, marked [DSM]).

GRPO as the report writes it: G samples per question, advantages normalised within the group, the clipped
objective, a KL penalty to the reference model with the k3 estimator, no value network. TRL's GRPOTrainer runs
it with loss_type "grpo" (each sequence's token mean, then the group mean), scale_rewards "group" and the bias-
corrected KL off, which is the report's formula; its own defaults differ (dapo loss, beta 0).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from v3flow.section import Section
from v3flow.tasks import TaskConfig
from v3flow.training.posttrain_recipe import InputRelativeLr, RouterAndMtp


class GrpoConfig(RouterAndMtp, InputRelativeLr):  # + router, bias_speed, mtp, mtp_refit_*, lr
    unhashed: ClassVar[frozenset[str]] = frozenset({"log_steps", "save_steps"})
    steps: int = Field(1000, gt=0, description="Optimizer steps; each samples a fresh group for every prompt.")
    prompts_per_step: int = Field(16, gt=0, description="Questions per step ([DSM]: batch 1024 = 16 x 64).")
    num_generations: int = Field(64, ge=2, description="G, samples per question ([DSM]: 64).")
    max_completion_length: int = Field(1024, gt=0, description="Generation limit per sample ([DSM]: 1024).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts (R1-Zero: 1.0).")
    top_p: float = Field(1.0, gt=0, le=1)
    lr_scale: float = Field(1e-6 / 2.2e-4, gt=0, description="Constant learning rate as a multiple of the input "
                            "model's pretraining peak, used when lr is unset ([DSM]'s 1e-6 over the report's 2.2e-4).")
    beta: float = Field(0.04, ge=0, description="KL coefficient to the reference model ([DSM]: 0.04; R1: 0.001).")
    epsilon: float = Field(0.2, gt=0, description="Clipping range (not given by the report or [DSM]; PPO's 0.2).")
    num_iterations: int = Field(1, gt=0, description="Policy updates per generated batch, mu ([DSM]: 1).")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        "grpo", description="grpo: the paper's per-sequence normalisation; TRL's default is dapo.")
    rewards: dict[Literal["accuracy", "format", "overlong"], float] = Field(
        default_factory=lambda: {"accuracy": 1.0, "format": 0.1},
        description="Rule-based rewards and their weights (R1: accuracy plus a format reward; overlong: DAPO's "
        "soft length penalty over the last `overlong_buffer` tokens).")
    overlong_buffer: int = Field(256, gt=0, description="Tokens before max_completion_length where the overlong "
                                 "reward starts to fall.")
    micro_batch: int = Field(8, gt=0, description="Completions per process per forward pass.")
    num_processes: int = Field(1, gt=0)
    truncation_alarm: float = Field(0.9, gt=0, le=1, description="Stop with an error when this share of completions "
                                    "hits max_completion_length for `alarm_steps` logged steps in a row.")
    alarm_steps: int = Field(3, gt=0)
    select_prompts: int = Field(0, ge=0, description="Candidate training problems each sampled G times by the input "
                                "model before training; only those whose pass rate lies strictly between 0 and 1 "
                                "become prompts (a group that is all right or all wrong has no gradient). 0: every "
                                "problem, unselected.")
    fp32_logits: bool = Field(True, description="The LM head of the policy and the reference outside autocast: "
                              "log-probabilities, ratio and KL from FP32 logits.")
    weight_decay: float = 0.0
    grad_clip: float = Field(1.0, gt=0)
    save_steps: int = Field(50, gt=0)
    log_steps: int = Field(1, gt=0)
    seed: int = 1234

    @model_validator(mode="after")
    def _batch(self) -> GrpoConfig:
        completions = self.prompts_per_step * self.num_generations
        unit = self.micro_batch * self.num_processes
        if completions % unit:  # TRL's own check comes only after the model is loaded (trl #3061)
            raise ValueError(f"posttrain.grpo: prompts_per_step x num_generations = {completions} completions per step "
                             f"must be a multiple of micro_batch x num_processes = {unit}")
        if self.overlong_buffer > self.max_completion_length:
            raise ValueError(f"posttrain.grpo.overlong_buffer={self.overlong_buffer} exceeds max_completion_length="
                             f"{self.max_completion_length}")
        if not self.rewards:
            raise ValueError("posttrain.grpo.rewards: name at least one reward (accuracy, format)")
        return self


class GrpoStageConfig(Section):
    """What the GRPO stage's outputs depend on: the task (prompts, rewards) and the recipe."""

    task: TaskConfig
    grpo: GrpoConfig


def completions_cover_what_sft_teaches(cfg) -> None:
    """GRPO's generation limit must leave room for the responses SFT taught (R1: 32K tokens); a shorter limit cuts
    them and its rewards vanish."""
    g, d = cfg.posttrain.grpo, cfg.posttrain.distill
    if g.max_completion_length < d.max_response_tokens:
        raise ValueError(f"posttrain.grpo.max_completion_length={g.max_completion_length} is shorter than the "
                         f"responses SFT teaches (posttrain.distill.max_response_tokens={d.max_response_tokens})")
