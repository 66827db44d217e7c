"""Context extension stages (report §4.3): one YaRN phase each, the model of role `model` in, trained at its
phase's length on the packed data of role `data`, the standard model artifact out (model.json, checkpoint,
Hugging Face folder whose config carries the `yarn` rope parameters).

YaRN is switched on here, explicitly, by the phase's model config (never inferred from a sequence length),
with the same factor in both phases and `original_seq_len` equal to the pretraining length: both are checked
against the input model before anything trains. A phase trains on the library's loop (v3flow/training: precision,
guards, exact resume, MaxVio, tokens/s, memory) with pretraining's recipe, a constant schedule, and the phase's
batch and length. Each phase's data is the corpus packed again at its length (`packing`, a pack stage's section).

    phase 1   pretrained model (4K)    -> 32K sequences, batch 1920, 1000 steps   (tiny: 512 -> 2048, 2 x 2048)
    phase 2   phase 1's model (32K)    -> 128K sequences, batch 480, 1000 steps   (tiny: 2048 -> 4096, 1 x 4096)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from stages.extend.config import ExtensionConfig
from v3flow import training
from v3flow.corpus import PackingSettings
from v3flow.errors import ConfigError
from v3flow.model.args import ModelConfig
from v3flow.section import Section, section_hash
from v3flow.stage import StageResult, StageSpec
from v3flow.training import artifact, train
from v3flow.training.recipe import Recipe
from v3flow.training.schedule import ConstantSchedule

Phase = Literal["phase1", "phase2"]


class ExtendStageConfig(Section):
    """What a phase's outputs depend on: its name, the model at its length with YaRN on, its training recipe."""

    phase: Phase
    model: ModelConfig
    recipe: Recipe


def phase_section(model: ModelConfig, pretrain: Recipe, ext: ExtensionConfig, phase: Phase) -> ExtendStageConfig:
    """The phase's model (max_seq_len = its length, YaRN on) and recipe: pretraining's, with a constant learning
    rate, the phase's batch and steps, lambda and gamma from the extension config."""
    p = getattr(ext, phase)
    schedule = ConstantSchedule(
        total_tokens=p.steps * p.batch_sequences * p.seq_len, peak_lr=ext.lr, warmup_steps=ext.warmup_steps,
        batch=p.batch_sequences, mtp_weight=ext.mtp_weight, bias_speed=ext.bias_speed,
        balance_alpha=pretrain.schedule.balance_alpha)
    recipe = pretrain.model_copy(update={
        "schedule": schedule, "micro_batch": ext.micro_batch, "attention": ext.attention,
        "activation_checkpointing": ext.activation_checkpointing, "log_every": ext.log_every,
        "checkpoint_every": ext.checkpoint_every,
        "eval_every": ext.eval_every, "eval_batches": ext.eval_batches, "init_from": None, "export_hf": True})
    return ExtendStageConfig(phase=phase, model=model.model_copy(update={"max_seq_len": p.seq_len, "yarn": ext.yarn}),
                             recipe=recipe)


def section(phase: Phase):
    """The phase's stage section, from the pipeline config."""
    return lambda cfg, wiring: phase_section(cfg.model, cfg.pretrain, cfg.extension, phase)


def starts_at_pretraining_length(cfg) -> None:
    L, yarn = cfg.data.packing.seq_len, cfg.extension.yarn
    if yarn.original_seq_len != L:
        raise ValueError(f"extension.yarn.original_seq_len={yarn.original_seq_len} must equal the pretraining "
                         f"length data.packing.seq_len={L}")


def spec(phase: Phase, start: str) -> StageSpec:
    """The stage of a phase: the model of stage `start` trained on the pack stage `pack_<phase>`'s data."""
    return StageSpec(
        f"extend_{phase}", __name__, section(phase),
        settings={"model": ModelConfig, "pretrain": Recipe, "extension": ExtensionConfig},
        inputs={"model": start, "data": f"pack_{phase}"}, libraries=training.LIBRARIES, headline=train.HEADLINE,
        model=True, phase="extend", curves=train.CURVES, checks=(starts_at_pretraining_length,))


def packing(phase: Phase):
    """The section of the pack stage that packs a phase's data: the corpus at its length, long documents
    upsampled."""
    def settings(cfg, wiring) -> PackingSettings:
        ext = cfg.extension
        return cfg.data.packing.model_copy(update={"seq_len": getattr(ext, phase).seq_len,
                                                   "long_share": ext.long_docs.long_share,
                                                   "long_min_tokens": ext.long_docs.long_min_tokens})
    return settings


def run(cfg: ExtendStageConfig, out_dir: Path, inputs: dict[str, StageResult], resolve=Path) -> StageResult:
    stage = f"extend_{cfg.phase}"
    source = Path(inputs["model"].outputs["model"])
    check_input(source, cfg.model)
    seq_len = artifact_seq_len(inputs["data"])
    if seq_len != cfg.model.max_seq_len:
        raise ConfigError(f"{stage}: the packed data has {seq_len}-token sequences, the phase trains at "
                          f"{cfg.model.max_seq_len} (extension.{cfg.phase}.seq_len)")
    p, batch = cfg.recipe, cfg.recipe.schedule.batch
    if batch % (p.micro_batch * p.num_processes):  # the trainer would round it: the recipe's batch is fixed
        raise ConfigError(f"extension.{cfg.phase}.batch_sequences={batch} is not a multiple of extension.micro_batch "
                          f"x pretrain.num_processes = {p.micro_batch} x {p.num_processes}")
    yarn, gamma = cfg.model.yarn, cfg.recipe.schedule.bias_speed
    result = train.train(stage, cfg.model, cfg.recipe, section_hash(cfg), Path(out_dir), inputs, str(source), resolve,
                   extra={"phase": cfg.phase, "mtp": "trained on (lambda from extension.mtp_weight)",
                          "router_biases": f"carried over, updated with gamma = {gamma}" if gamma else
                          "carried over unchanged (gamma = 0)"})
    result.report_md = "\n".join([
        f"## Context extension, {cfg.phase}: {yarn.original_seq_len:,} -> {cfg.model.max_seq_len:,} tokens", "",
        (f"YaRN: s = {yarn.factor:g}, beta_fast {yarn.beta_fast:g}, beta_slow {yarn.beta_slow:g}, original length "
         f"{yarn.original_seq_len:,}, softmax scale x {yarn.attention_mscale() ** 2:.3f} (mscale^2); from `{source}`."),
        "", result.report_md])
    return result


def artifact_seq_len(data: StageResult) -> int:
    return json.loads(Path(data.outputs["manifest"]).read_text())["seq_len"]


def check_input(source: Path, model: ModelConfig) -> None:
    """The input model must be this architecture, pretrained at yarn.original_seq_len, and, if already extended
    (phase 2), with this very YaRN scaling: the report keeps s fixed across both phases."""
    artifact.check_compatible(source, model, "extension input model")
    have, yarn = artifact.model_config(source), model.yarn
    if have.yarn is None and have.max_seq_len != yarn.original_seq_len:
        raise ConfigError(f"extension.yarn.original_seq_len={yarn.original_seq_len}, but the input model {source} "
                          f"was trained at {have.max_seq_len} tokens: set it to the pretraining length")
    if have.yarn is not None and have.yarn != yarn:
        diff = {k: (v, getattr(yarn, k)) for k, v in have.yarn.model_dump().items() if v != getattr(yarn, k)}
        raise ConfigError(f"extension.yarn differs from the YaRN of the input model {source} (the same scaling is "
                          "used in both phases): " + ", ".join(f"{k}: {a} there, {b} here" for k, (a, b) in diff.items()))
