"""Pretraining stage: packed data in (role `data`), a trained DeepSeek-V3 out as the standard model artifact.

The training itself is the library's (v3flow/training/train.py: spec, launch, loop, model artifact); this stage
says what pretraining trains: the config's architecture with its recipe, from random weights or from
`pretrain.init_from` (an existing model: ours or a Hugging Face folder).
"""

from __future__ import annotations

from pathlib import Path

from v3flow import training
from v3flow.cache import files_fingerprint
from v3flow.model.args import ModelConfig
from v3flow.section import Section, section_hash
from v3flow.stage import StageResult, StageSpec
from v3flow.training import artifact, train
from v3flow.training.recipe import Recipe

STAGE = "pretrain"


class PretrainStageConfig(Section):
    """What the pretraining stage's outputs depend on: the architecture and the training recipe."""

    model: ModelConfig
    pretrain: Recipe


def vocab_matches_tokenizer(cfg) -> None:
    if cfg.model.vocab_size != cfg.data.tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} must equal "
                         f"data.tokenizer.vocab_size={cfg.data.tokenizer.vocab_size}")


def batch_fits(cfg) -> None:
    p = cfg.pretrain
    unit = p.micro_batch * p.num_processes
    key = "batch_start" if p.schedule.kind == "report" else "batch"
    if getattr(p.schedule, key) < unit:
        raise ValueError(f"pretrain.schedule.{key}={getattr(p.schedule, key)} is below micro_batch x "
                         f"num_processes = {unit}")
    if cfg.model.max_seq_len < cfg.data.packing.seq_len:
        raise ValueError(f"model.max_seq_len={cfg.model.max_seq_len} is below data.packing.seq_len="
                         f"{cfg.data.packing.seq_len}")


def accelerate_config_exists(cfg) -> None:
    path = cfg.pretrain.accelerate_config
    if cfg.pretrain.launcher == "accelerate" and not cfg.resolve(path).is_file():
        raise ValueError(f"pretrain.accelerate_config={path!r}: no such file {cfg.resolve(path)}")


SPEC = StageSpec(
    STAGE, __name__, lambda cfg, wiring: PretrainStageConfig(model=cfg.model, pretrain=cfg.pretrain),
    settings={"model": ModelConfig, "pretrain": Recipe}, inputs={"data": "pack"}, libraries=training.LIBRARIES,
    headline=train.HEADLINE, model=True, curves=train.CURVES, report=("experts",),
    checks=(vocab_matches_tokenizer, batch_fits, accelerate_config_exists))


def fingerprint(cfg: PretrainStageConfig, resolve) -> str:
    """The files of `pretrain.init_from`, when set: part of the stage's key (another model, another run)."""
    if not cfg.pretrain.init_from:
        return ""
    return files_fingerprint(resolve(cfg.pretrain.init_from))


def run(cfg: PretrainStageConfig, out_dir: Path, inputs: dict[str, StageResult], resolve=Path) -> StageResult:
    init_from = str(resolve(cfg.pretrain.init_from)) if cfg.pretrain.init_from else None
    if init_from:
        artifact.check_compatible(Path(init_from), cfg.model, "pretrain.init_from")
    result = train.train(STAGE, cfg.model, cfg.pretrain, section_hash(cfg), Path(out_dir), inputs, init_from, resolve)
    result.report_md = f"## Pretraining\n\n{result.report_md}"
    return result
