"""Context extension stages (report §4.3): one YaRN phase each, the model of role `model` in, trained at its
phase's length on the packed data of role `data`, the standard model artifact out (model.json, checkpoint,
Hugging Face folder whose config carries the `yarn` rope parameters).

YaRN is switched on here, explicitly, by the phase's model config (never inferred from a sequence length),
with the same factor in both phases and `original_seq_len` equal to the pretraining length: both are checked
against the input model before anything trains. The training loop is pretraining's (precision, guards,
exact resume, MaxVio, tokens/s, memory), at a constant learning rate, with the phase's batch and length.

    phase 1   pretrained model (4K)    -> 32K sequences, batch 1920, 1000 steps   (tiny: 512 -> 2048, 2 x 2048)
    phase 2   phase 1's model (32K)    -> 128K sequences, batch 480, 1000 steps   (tiny: 2048 -> 4096, 1 x 4096)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from v3flow.errors import ConfigError
from v3flow.model.args import ModelConfig
from v3flow.section import Section, section_hash
from v3flow.stage import StageResult
from stages.data.config import PackingSettings
from stages.extend.config import ExtensionConfig
from stages.pretrain import train
from stages.pretrain.config import PretrainConfig
from stages.pretrain.schedule import ScheduleConfig
from v3flow.training import artifact

Phase = Literal["phase1", "phase2"]


class ExtendStageConfig(Section):
    """What a phase's outputs depend on: its name, the model at its length with YaRN on, its training recipe."""

    phase: Phase
    model: ModelConfig
    pretrain: PretrainConfig


def section(model: ModelConfig, pretrain: PretrainConfig, ext: ExtensionConfig, phase: Phase) -> ExtendStageConfig:
    """The phase's model (max_seq_len = its length, YaRN on) and recipe: pretraining's, with a constant learning
    rate, the phase's batch and steps, lambda and gamma from the extension config."""
    p = getattr(ext, phase)
    b = p.batch_sequences
    schedule = ScheduleConfig(
        total_tokens=p.steps * b * p.seq_len, peak_lr=ext.lr, warmup_steps=ext.warmup_steps, constant_until=1.0,
        decay_until=1.0, tail_from=1.0, batch_start=b, batch_end=b, batch_ramp_until=0.0, mtp_weight=ext.mtp_weight,
        mtp_weight_late=ext.mtp_weight, bias_speed=ext.bias_speed, bias_off_from=1.0,
        balance_alpha=pretrain.schedule.balance_alpha)
    recipe = pretrain.model_copy(update={
        "schedule": schedule, "micro_batch": ext.micro_batch, "attention": ext.attention,
        "activation_checkpointing": ext.activation_checkpointing, "log_every": ext.log_every,
        "checkpoint_every": ext.checkpoint_every,
        "eval_every": ext.eval_every, "eval_batches": ext.eval_batches, "init_from": None, "export_hf": True})
    return ExtendStageConfig(phase=phase, model=model.model_copy(update={"max_seq_len": p.seq_len, "yarn": ext.yarn}),
                             pretrain=recipe)


def packing(packing: PackingSettings, ext: ExtensionConfig, phase: Phase) -> PackingSettings:
    """The pack stage's settings for a phase: its length, long documents upsampled."""
    return packing.model_copy(update={"seq_len": getattr(ext, phase).seq_len, "long_share": ext.long_docs.long_share,
                                      "long_min_tokens": ext.long_docs.long_min_tokens})


def run(cfg: ExtendStageConfig, out_dir: Path, inputs: dict[str, StageResult], resolve=Path) -> StageResult:
    stage = f"extend_{cfg.phase}"
    source = Path(inputs["model"].outputs["model"])
    check_input(source, cfg.model)
    seq_len = artifact_seq_len(inputs["data"])
    if seq_len != cfg.model.max_seq_len:
        raise ConfigError(f"{stage}: the packed data has {seq_len}-token sequences, the phase trains at "
                          f"{cfg.model.max_seq_len} (extension.{cfg.phase}.seq_len)")
    p, batch = cfg.pretrain, cfg.pretrain.schedule.batch_end
    if batch % (p.micro_batch * p.num_processes):  # the trainer would round it: the recipe's batch is fixed
        raise ConfigError(f"extension.{cfg.phase}.batch_sequences={batch} is not a multiple of extension.micro_batch "
                          f"x pretrain.num_processes = {p.micro_batch} x {p.num_processes}")
    yarn, gamma = cfg.model.yarn, cfg.pretrain.schedule.bias_speed
    result = train(stage, cfg.model, cfg.pretrain, section_hash(cfg), Path(out_dir), inputs, str(source), resolve,
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
