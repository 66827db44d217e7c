"""What a trainer process runs: the typed `run.json` a training stage writes into its run folder and its trainer
process reads back (our loop, or one of TRL's trainers). A resumed run reads the same file.

    LoopSpec     our loop (v3flow/training/loop.py): architecture, recipe, packed data, lineage, init_from
    TrlSpec[R]   a TRL trainer process: the input model's Hugging Face export, the precision chosen once, the
                 stage's recipe R and its data (SFT rows or GRPO prompts, parquet)

`model` is the architecture in every shape: our checkpoint loader reads it beside a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Generic, Self, TypeVar

from pydantic import BaseModel, ConfigDict

from v3flow.model.args import ModelConfig
from v3flow.training.recipe import Recipe


class TrainerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    FILE: ClassVar[str] = "run.json"

    stage: str  # the stage the process trains for, in its log lines and model artifact
    model: ModelConfig

    def write(self, run_dir: Path) -> Path:
        path = Path(run_dir) / self.FILE
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def read(cls, run_dir: Path) -> Self:
        return cls.model_validate_json((Path(run_dir) / cls.FILE).read_text())


class LoopSpec(TrainerSpec):
    recipe: Recipe
    manifest: str  # the packed data's manifest.json
    tokenizer: str  # its tokenizer folder (exported with the model)
    lineage: dict[str, str] = {}
    init_from: str | None = None  # a model to start from instead of a random init


R = TypeVar("R", bound=BaseModel)


class TrlSpec(TrainerSpec, Generic[R]):
    hf_in: str  # the input model's Hugging Face folder
    bf16: bool  # chosen once: a resumed run keeps the choice of the run it continues
    recipe: R
    data: str  # parquet: SFT rows or GRPO prompts
