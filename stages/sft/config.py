"""Config of the SFT stage. Defaults are the report's (§5.1): 2 epochs, cosine learning rate from 5e-6 down to
1e-6 (by default the same multiples of the input model's pretraining peak as these are of 2.2e-4), several samples
packed into each sequence and masked from each other; both of the report's forms. The report does not give the
batch, warmup or optimizer of SFT: pretraining's AdamW settings are used."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from v3flow.training.posttrain_recipe import InputRelativeLr, RouterAndMtp


class SftConfig(RouterAndMtp, InputRelativeLr):  # + router, bias_speed, mtp, mtp_refit_*, lr
    unhashed: ClassVar[frozenset[str]] = frozenset({"log_steps", "save_steps"})
    epochs: float = Field(2.0, gt=0, description="Passes over the distilled data (report: 2).")
    lr_scale: float = Field(5e-6 / 2.2e-4, gt=0, description="Peak learning rate as a multiple of the input model's "
                            "pretraining peak, used when lr is unset (report: 5e-6 after 2.2e-4, 0.0227).")
    min_lr_ratio: float = Field(0.2, ge=0, le=1, description="The cosine schedule ends at this fraction of the peak "
                                "(report: 1e-6 / 5e-6).")
    warmup_steps: int = Field(0, ge=0)
    batch_sequences: int = Field(64, gt=0, description="Packed sequences per optimizer step, over all processes.")
    micro_batch: int = Field(1, gt=0, description="Packed sequences per process per forward pass.")
    num_processes: int = Field(1, gt=0, description="Data-parallel processes (`accelerate launch`).")
    max_length: int = Field(4096, gt=0, description="Tokens per packed sequence.")
    packing: bool = Field(True, description="Pack samples into sequences (best-fit decreasing), each sample masked "
                          "from the others through its own position ids (the report's sample masking).")
    forms: list[Literal["original", "r1"]] = Field(default_factory=lambda: ["original", "r1"],
                                                   description="Which of the distilled forms to train on.")
    general_share: float = Field(0.25, ge=0, lt=1, description="Share of the training tokens that are general data "
                                 "(role `general`: the pretraining corpus's packed sequences), trained as plain language "
                                 "model rows beside the distilled samples, so that SFT adds a skill without erasing the "
                                 "rest (the report mixes non-reasoning data into SFT; R1: ~200K beside ~600K).")
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)
    save_steps: int = Field(100, gt=0, description="Steps between checkpoints (a killed run resumes from the last).")
    log_steps: int = Field(10, gt=0)
    seed: int = 1234

    @model_validator(mode="after")
    def _batch(self) -> SftConfig:
        if self.batch_sequences % (self.micro_batch * self.num_processes):
            raise ValueError(f"posttrain.sft.batch_sequences={self.batch_sequences} must be a multiple of micro_batch x "
                             f"num_processes = {self.micro_batch} x {self.num_processes}")
        return self
