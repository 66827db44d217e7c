"""Config of context extension (report §4.3): two YaRN phases after pretraining (their evaluation, the section's
`eval`, is the long_eval stage's).

The defaults are the report's: YaRN with s = 40, alpha = 1, beta = 32 (beta_slow / beta_fast in DeepSeek's
code), the same factor in both phases; phase 1 at 32K tokens with batch 1920, phase 2 at 128K with batch 480,
1000 steps each, constant learning rate 7.3e-6 (the last pretraining LR). Everything else (precision, guards,
launcher, optimizer) is the pretraining recipe's: a phase trains as pretraining does, from the previous
model, at its own sequence length.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from v3flow.model.args import YarnConfig
from v3flow.section import Section
from v3flow.training.recipe import AttentionKernel, Recompute


class PhaseSettings(Section):
    seq_len: int = Field(gt=0, description="Tokens per training sequence of the phase (report: 32K, then 128K).")
    batch_sequences: int = Field(gt=0, description="Sequences per step (report: 1920, then 480: the same "
                                 "tokens per step in both phases).")
    steps: int = Field(gt=0, description="Optimizer steps (report: 1000 per phase).")


class LongDataSettings(Section):
    """Sequences of each phase are packed from the tokenized corpus again (the pack stage), with long
    documents upsampled to a share of the training tokens (length upsampling, Fu et al. 2024, arXiv
    2402.10171); short documents keep the rest, so the phase still sees the pretraining mix."""

    long_share: float = Field(0.5, ge=0, lt=1, description="Share of training tokens from long documents after "
                              "upsampling (never below their natural share).")
    long_min_tokens: int | None = Field(None, gt=0, description="A document this long counts as long; default: "
                                        "the phase's sequence length.")


class ExtensionConfig(Section):
    yarn: YarnConfig = Field(default_factory=YarnConfig, description="The YaRN scaling switched on for both "
                             "phases (report: s = 40, beta_fast 32, beta_slow 1); original_seq_len must be the "
                             "pretraining length.")
    lr: float = Field(7.3e-6, gt=0, description="Constant learning rate of both phases (report: 7.3e-6).")
    warmup_steps: int = Field(0, ge=0)
    bias_speed: float = Field(0.0, ge=0, description="gamma of the router biases during extension (the report "
                              "freezes it, gamma = 0, for the end of pretraining and says nothing of extension).")
    mtp_weight: float = Field(0.1, ge=0, description="lambda (the report's value at the end of pretraining).")
    micro_batch: int = Field(1, gt=0, description="Sequences per process per forward pass.")
    attention: AttentionKernel = Field("memory_efficient", description="As pretrain.attention: the fused kernel "
                                       "by default, since phases are long.")
    activation_checkpointing: Recompute = Field("none", description="As pretrain.activation_checkpointing.")
    log_every: int = Field(10, gt=0, description="Steps between logged training metrics (tokens/s, MaxVio).")
    checkpoint_every: int = Field(100, gt=0)
    eval_every: int = Field(100, gt=0)
    eval_batches: int = Field(4, gt=0)
    long_docs: LongDataSettings = Field(default_factory=LongDataSettings)
    phase1: PhaseSettings = Field(default_factory=lambda: PhaseSettings(seq_len=32768, batch_sequences=1920,
                                                                        steps=1000))
    phase2: PhaseSettings = Field(default_factory=lambda: PhaseSettings(seq_len=131072, batch_sequences=480,
                                                                        steps=1000))

    @model_validator(mode="after")
    def _lengths(self) -> ExtensionConfig:
        L, (p1, p2) = self.yarn.original_seq_len, (self.phase1.seq_len, self.phase2.seq_len)
        if not L < p1 < p2:
            raise ValueError(f"extension: need yarn.original_seq_len ({L}) < phase1.seq_len ({p1}) < "
                             f"phase2.seq_len ({p2})")
        if self.yarn.factor * L < p2:
            raise ValueError(f"extension.yarn.factor={self.yarn.factor} x original_seq_len={L} is below "
                             f"phase2.seq_len={p2}: YaRN would not cover the target length")
        for name in ("phase1", "phase2"):
            if getattr(self, name).batch_sequences % self.micro_batch:
                raise ValueError(f"extension.{name}.batch_sequences must be a multiple of extension.micro_batch "
                                 f"({self.micro_batch})")
        return self
