"""The parts of a TRL stage's recipe (SFT, GRPO) shared by both: its learning rate, set relative to the recipe
that made the input model (`InputRelativeLr`), and what it does to the two parts of DeepSeek-V3 that transformers'
`DeepseekV3ForCausalLM` does not train by itself: the router biases and the MTP module. Both stages' configs
inherit it, so the fields, defaults and descriptions live here once.

Why: post-training without them measurably undoes pretraining's work. With the biases frozen, MaxVio went
0.39 -> 1.44 (the trunk moves, the routing follows it, nothing pulls the loads back); with the MTP module carried
over, its acceptance went 0.77 -> 0.34 (it predicts from the trunk's final hidden states, which post-training
moved). `bias_update` keeps the report's auxiliary-loss-free rule running during TRL training; `refit` trains the
MTP module alone afterwards, on packed pretraining sequences, with the trunk frozen (v3flow/training/mtp_refit.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from v3flow.section import Section


class RouterAndMtp(Section):
    router: Literal["bias_update", "frozen"] = Field(
        "bias_update", description="bias_update: the router weights train and, after every optimizer step, each "
        "router bias moves by b_i += gamma * sign(mean load - load_i) (report §2.1.2); frozen: router weights and "
        "biases stay as in the input model.")
    bias_speed: float = Field(0.001, ge=0, description="gamma of the bias update (report: 0.001, then 0 for the "
                              "last 500B pretraining tokens).")
    mtp: Literal["refit", "carry"] = Field(
        "refit", description="refit: after TRL training, train the MTP module alone (trunk, embedding and head "
        "frozen) on packed pretraining sequences; carry: keep the input model's MTP module unchanged.")
    mtp_refit_steps: int = Field(50, gt=0, description="Optimizer steps of the MTP refit.")
    mtp_refit_lr: float = Field(1e-4, gt=0, description="Peak learning rate of the refit: linear warmup over the "
                                "first tenth of the steps, cosine down to a tenth of it (pretraining's peak: 2.2e-4).")
    mtp_refit_batch: int = Field(4, gt=0, description="Packed sequences per refit step.")
    mtp_refit_eval: int = Field(16, gt=0, description="Held-out (val split) sequences the MTP loss is measured on, "
                                "before and after the refit.")


class InputRelativeLr(Section):
    """The peak learning rate, absolute (`lr`) or, when that is unset, `lr_scale` times the peak learning rate of
    the pretraining that made the input model (recorded in its model.json): a recipe scaled to another model size
    or schedule keeps post-training's place relative to it (the report: SFT at 5e-6 after pretraining at 2.2e-4).
    Each stage sets its own `lr_scale` default."""

    lr: float | None = Field(None, gt=0, description="Peak learning rate; unset: lr_scale x the input model's "
                             "pretraining peak learning rate (model.json `pretraining_peak_lr`).")
    lr_scale: float = Field(gt=0, description="Peak learning rate as a multiple of the input model's pretraining "
                            "peak, used when lr is unset (no default here: each stage gives its own).")
