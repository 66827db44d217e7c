"""The pipeline's config: each stage's section (its schema lives with its stage) composed into one
`PipelineConfig`, with the checks that span sections. Loading and error reporting are v3flow/config.py's.

Each section has a stable content hash (`section_hash`) that goes into the stage's cache key and lineage.
Fields that cannot change a stage's outputs (how many workers run it, where) are left out of that hash, so
moving a run from a laptop to Slurm reuses its results.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from v3flow.config import Section, deep_merge, load
from v3flow.errors import ConfigError
from v3flow.model.args import ModelConfig
from v3flow.registry import RegistryConfig
from stages.data.config import DataConfig, expand_sources
from stages.distill.config import DistillConfig
from stages.evaluate import EvaluateSettings
from stages.extend.config import ExtensionConfig
from stages.grpo.config import GrpoConfig
from stages.pretrain.config import PretrainConfig
from stages.sft.config import SftConfig
from stages.task_eval import TaskEvalSettings
from v3flow.tasks import TaskConfig
from v3flow.tasks.arithmetic import ArithmeticSettings

__all__ = ["PipelineConfig", "PosttrainConfig", "TrackingConfig", "load_config"]


class TrackingConfig(Section):
    experiment: str = "v3flow"
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; MLFLOW_TRACKING_URI wins when set.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig)


class PosttrainConfig(Section):
    """Post-training (report §5): the task, R1-style distillation, SFT, GRPO and their evaluation."""

    task: TaskConfig = Field(default_factory=ArithmeticSettings)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    eval: TaskEvalSettings = Field(default_factory=TaskEvalSettings)


class PipelineConfig(Section):
    """The whole pipeline; one section per stage."""

    name: str
    seed: int = 1234
    workdir: str = Field("data/outputs", description="Stage outputs, content-addressed (relative: to the project).")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    extension: ExtensionConfig = Field(default_factory=ExtensionConfig)
    posttrain: PosttrainConfig = Field(default_factory=PosttrainConfig)
    evaluation: EvaluateSettings = Field(default_factory=EvaluateSettings)
    inputs: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Which stage fills a stage's input role where it is not the default, "
        "{stage: {role: providing stage}}: e.g. {sft: {model: pretrain}} when context extension is off. Checked "
        "against the pipeline's stages before anything runs; a stage's key follows the results it reads.")

    # Set by the loader, not part of the YAML schema.
    source_file: str | None = Field(None, exclude=True)
    project_root: str | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _vocab_matches_tokenizer(self) -> PipelineConfig:
        if self.model.vocab_size != self.data.tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} must equal "
                             f"data.tokenizer.vocab_size={self.data.tokenizer.vocab_size}")
        return self

    @model_validator(mode="after")
    def _batch_fits(self) -> PipelineConfig:
        p = self.pretrain
        unit = p.micro_batch * p.num_processes
        if p.schedule.batch_start < unit:
            raise ValueError(f"pretrain.schedule.batch_start={p.schedule.batch_start} is below micro_batch x "
                             f"num_processes = {unit}")
        if self.model.max_seq_len < self.data.packing.seq_len:
            raise ValueError(f"model.max_seq_len={self.model.max_seq_len} is below data.packing.seq_len="
                             f"{self.data.packing.seq_len}")
        return self

    @model_validator(mode="after")
    def _extension_starts_at_pretraining_length(self) -> PipelineConfig:
        L, yarn = self.data.packing.seq_len, self.extension.yarn
        if yarn.original_seq_len != L:
            raise ValueError(f"extension.yarn.original_seq_len={yarn.original_seq_len} must equal the pretraining "
                             f"length data.packing.seq_len={L}")
        return self

    @model_validator(mode="after")
    def _pretraining_never_sees_held_out_problems(self) -> PipelineConfig:
        task = self.posttrain.task
        for i, src in enumerate(self.data.sources):
            if src.task is not None and src.task.model_copy(update={"train_size": task.train_size}) != task:
                raise ValueError(f"data.sources.{i}.task ({src.name}) differs from posttrain.task in more than "
                                 "train_size: its documents could hold the held-out problems of the evaluation")
        return self

    def workdir_path(self) -> Path:
        path = Path(self.workdir)
        return path if path.is_absolute() else Path(self.project_root or ".") / path

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.project_root or ".") / p


def _expand(raw: dict, root: Path, path: Path) -> None:
    if isinstance(raw.get("data"), dict):
        expand_sources(raw["data"], root, path)
        posttrain = raw.get("posttrain") if isinstance(raw.get("posttrain"), dict) else {}
        task = posttrain.get("task") if isinstance(posttrain.get("task"), dict) else {"name": "arithmetic"}
        for source in raw["data"].get("sources") or []:
            if isinstance(source, dict) and source.get("kind") == "task":  # posttrain.task, a train_size of its own
                source["task"] = deep_merge(task, source.get("task") or {})


def load_config(path: str | Path, overrides: list[str] | None = None, require_set: bool = True) -> PipelineConfig:
    """Load and validate a pipeline config (see v3flow/config.py); `require_set=False` lets placeholders
    (`???`) through, for commands that only read the config (`v3flow params`)."""
    cfg, root = load(PipelineConfig, path, overrides, require_set, _expand)
    cfg.source_file = str(Path(path).resolve())
    cfg.project_root = str(root)
    accelerate_config = cfg.pretrain.accelerate_config
    if require_set and cfg.pretrain.launcher == "accelerate" and not cfg.resolve(accelerate_config).is_file():
        raise ConfigError(f"{cfg.source_file}: pretrain.accelerate_config={accelerate_config!r}: no such file "
                          f"{cfg.resolve(accelerate_config)}")
    return cfg
