"""The training recipe of our loop (v3flow/training/loop.py): optimizer, precision, guards, schedule, checkpoints.

It is the config's `pretrain` section, and each context-extension phase trains on a copy of it with a constant
schedule. Defaults are the report's (§4.2); configs/tiny.yaml scales them down."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from v3flow.section import Section
from v3flow.training.schedule import Schedule, ScheduleConfig


class GuardConfig(Section):
    """Never train on garbage: a non-finite loss, or one above spike_factor x its running mean, skips the
    update; max_skips skipped steps in a row roll the run back to its last checkpoint. The running mean is the
    plain mean of the first `history` losses, then exponential: one lucky first batch (a repeated long document at
    loss 0.8 where the others are at 4) must not make every ordinary batch after it a spike."""

    spike_factor: float = Field(3.0, gt=1)
    ema: float = Field(0.95, gt=0, lt=1, description="Smoothing of the running mean loss.")
    history: int = Field(10, ge=1, description="Losses averaged before a spike can be called.")
    max_skips: int = Field(3, ge=1)


AttentionKernel = Literal["any", "memory_efficient"]  # v3flow.model.attention.set_attention_kernel
Recompute = Literal["none", "attention", "blocks"]  # v3flow.model.transformer.checkpoint_activations


class Recipe(Section):
    unhashed: ClassVar[frozenset[str]] = frozenset(
        {"log_every", "keep_checkpoints", "figure_every", "launcher", "accelerate_config"})
    schedule: Schedule = Field(default_factory=ScheduleConfig, description="The report's (kind: report, the "
                               "default) or a constant learning rate (kind: constant).")
    micro_batch: int = Field(1, gt=0, description="Sequences per process per forward pass.")
    num_processes: int = Field(1, gt=0, description="Data-parallel processes (DDP over gloo on CPU, NCCL on GPU).")
    launcher: Literal["torchrun", "accelerate"] = Field(
        "torchrun", description="How several processes start: torchrun (CPU and GPU) or `accelerate launch` "
        "with accelerate_config (FSDP2 and multi-node).")
    accelerate_config: str | None = Field(
        None, description="accelerate config YAML for launcher: accelerate (relative: to the project), e.g. "
        "configs/accelerate/fsdp2.yaml or ddp.yaml. Its num_processes is replaced by ours.")
    precision: Literal["fp8", "bf16", "fp32"] = Field(
        "fp8", description="fp8: the report's FP8 GEMMs (1x128 / 128x128 scaling, v3flow/model/fp8.py), "
        "high_precision elsewhere; bf16: BF16 autocast; fp32: no mixed precision. Master weights and gradients "
        "stay FP32.")
    high_precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="What runs outside the FP8 GEMMs under precision fp8 (the report: BF16). auto: BF16 "
        "where a probe finds it at least as fast as FP32, else FP32 (CPUs without BF16 units); the choice is "
        "logged and recorded in MLflow (precision.*).")
    attention: AttentionKernel = Field(
        "any", description="any: PyTorch's attention kernel choice; memory_efficient: a fused kernel that never "
        "materialises T x T scores (long sequences; an error rather than a silent fallback).")
    document_mask: bool = Field(
        False, description="Attention within each packed document only (intra-document masking, as OLMo 3 and "
        "SmolLM3 train). The report packs documents without it (§4.1); the validation loss is computed the same way. "
        "The mask is T x T booleans per sequence: fine at pretraining lengths, not at 128K.")
    activation_checkpointing: Recompute = Field(
        "none", description="Recompute in the backward pass to fit longer sequences: attention, the MLA sublayers "
        "(selective recompute); blocks, every block, with head and loss in chunks (128K tokens on one GPU).")
    moment_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="Storage of the AdamW moments (the report: BF16).")
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    grad_clip: float = Field(1.0, gt=0)
    balancing: Literal["aux_free", "aux_loss", "none"] = Field(
        "aux_free", description="aux_free: bias updates + tiny sequence-wise loss (the report); aux_loss: a "
        "classic auxiliary balance loss of weight aux_loss_alpha, no bias; none: neither.")
    aux_loss_alpha: float = Field(0.01, ge=0, description="Weight of the classic auxiliary loss (aux_loss).")
    checkpoint_every: int = Field(1000, gt=0, description="Steps between full checkpoints.")
    keep_checkpoints: int = Field(2, gt=0)
    eval_every: int = Field(1000, gt=0)
    eval_batches: int = Field(20, gt=0, description="Validation batches of micro_batch sequences.")
    mtp_eval_prompts: int = Field(32, gt=0, description="Validation prompts decoded self-speculatively at the end "
                                  "to measure MTP draft acceptance (64 new tokens each).")
    log_every: int = Field(10, gt=0)
    figure_every: int = Field(500, gt=0, description="Steps between expert-load figures.")
    guards: GuardConfig = Field(default_factory=GuardConfig)
    seed: int = 1234
    export_hf: bool = Field(True, description="Export the final checkpoint in the Hugging Face format.")
    init_from: str | None = Field(
        None, description="Start from this model instead of a random init (relative: to the project): a model "
        "artifact folder, one of our checkpoints, or a Hugging Face deepseek_v3 folder. Weights and router "
        "biases are loaded; the optimizer and the schedule start fresh. Its files are part of the stage's key.")

    @field_validator("schedule", mode="before")
    @classmethod
    def _report_by_default(cls, value):
        return {"kind": "report", **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _launcher_has_config(self) -> Recipe:
        if self.launcher == "accelerate" and not self.accelerate_config:
            raise ValueError("pretrain.launcher=accelerate needs pretrain.accelerate_config (an accelerate config "
                             "YAML, e.g. configs/accelerate/fsdp2.yaml)")
        return self
