"""The pipeline's config, composed from the recipe: every stage declares the YAML sections it reads (its
`settings`, with their schemas, in its own module), and `PipelineConfig` is those sections under the few that
belong to the whole run (name, seed, workdir, tracking, inputs). A nested path (`posttrain.sft`,
`extension.eval`) adds a field to the section above it. Checks that span sections are the stages' too (`checks`)
and run once the config is loaded. Loading and error reporting are v3flow/config.py's.

Each stage's section has a stable content hash (`section_hash`) that goes into the stage's cache key and
lineage. Fields that cannot change a stage's outputs (how many workers run it, where) are left out of that hash,
so moving a run from a laptop to Slurm reuses its results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, create_model

from flows.recipe import RECIPE
from v3flow.config import Section, load
from v3flow.errors import ConfigError
from v3flow.registry import RegistryConfig
from v3flow.stage import StageSpec

__all__ = ["PipelineConfig", "TrackingConfig", "load_config"]


class TrackingConfig(Section):
    experiment: str = "v3flow"
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; MLFLOW_TRACKING_URI wins when set.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig)


class RunConfig(Section):
    """What belongs to the whole run; the stages' sections are added to it (`compose`)."""

    name: str
    seed: int = 1234
    workdir: str = Field("data/outputs", description="Stage outputs, content-addressed (relative: to the project).")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    inputs: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Which stage fills a stage's input role where it is not the default, "
        "{stage: {role: providing stage}}: e.g. {sft: {model: pretrain}} when context extension is off. Checked "
        "against the pipeline's stages before anything runs; a stage's key follows the results it reads.")

    # Set by the loader, not part of the YAML schema.
    source_file: str | None = Field(None, exclude=True)
    project_root: str | None = Field(None, exclude=True)

    def workdir_path(self) -> Path:
        path = Path(self.workdir)
        return path if path.is_absolute() else Path(self.project_root or ".") / path

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.project_root or ".") / p


def compose(specs: list[StageSpec], base: type[Section] = RunConfig, name: str = "PipelineConfig") -> type[Section]:
    """`base` with every section the stages declare (path -> schema, or (schema, default factory | ...))."""
    declared: dict[str, tuple[Any, Any]] = {}
    for spec in specs:
        for path, setting in spec.settings.items():
            schema, default = setting if isinstance(setting, tuple) else (setting, setting)
            if declared.setdefault(path, (schema, default))[0] != schema:
                raise TypeError(f"stage {spec.name} declares section {path} as {schema}, another stage as "
                                f"{declared[path][0]}")
    return _model(name, base, declared)


def _model(name: str, base: type[Section], declared: dict[str, tuple[Any, Any]]) -> type[Section]:
    fields = {}
    for key in dict.fromkeys(path.split(".")[0] for path in declared):
        if key in base.model_fields:  # declared by its owner already (data.packing inside data)
            continue
        schema, default = declared.get(key, (Section, Section))  # undeclared: a section of nested ones only
        nested = {p.removeprefix(f"{key}."): v for p, v in declared.items() if p.startswith(f"{key}.")}
        if nested:  # the section with the nested ones added; its default is the composed section
            composed = _model(f"{key.title()}Config" if schema is Section else schema.__name__, schema, nested)
            schema, default = composed, (default if default is ... else composed)
        fields[key] = (schema, Field(...) if default is ... else Field(default_factory=default))
    return create_model(name, __base__=base, **fields)


PipelineConfig = compose(RECIPE)


def load_config(path: str | Path, overrides: list[str] | None = None, require_set: bool = True) -> PipelineConfig:
    """Load and validate a pipeline config (see v3flow/config.py), then the stages' checks across sections;
    `require_set=False` lets placeholders (`???`) through, for commands that only read the config
    (`v3flow params`)."""
    def expand(raw: dict, root: Path, file: Path) -> None:
        for spec in RECIPE:
            if spec.expand:
                spec.expand(raw, root, file)

    cfg, root = load(PipelineConfig, path, overrides, require_set, expand)
    cfg.source_file = str(Path(path).resolve())
    cfg.project_root = str(root)
    for check in dict.fromkeys(check for spec in RECIPE for check in spec.checks):
        try:
            check(cfg)
        except ValueError as err:
            raise ConfigError(f"invalid config {cfg.source_file}:\n  {err}") from None
    return cfg
