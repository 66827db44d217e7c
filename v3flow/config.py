"""The pipeline's one typed config: each stage's pydantic model (in its own package), nested into `PipelineConfig`.

A config is a YAML file, optionally inheriting from another through `base: other.yaml`, plus command-line
overrides (`--set data.minhash.bands=20`). Everything is validated before any work starts: unknown keys,
wrong types and impossible combinations raise `ConfigError` naming the file, the line and the key.

Each section has a stable content hash (`section_hash`) that the flows use as the stage's cache key and
lineage tag. Fields that cannot change a stage's outputs (how many workers run it, where) are left out of
that hash, so moving a run from a laptop to Slurm reuses its results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from v3flow.errors import ConfigError
from v3flow.model.args import ModelConfig
from v3flow.section import Section, section_hash
from v3flow.stages.data.config import DataConfig, ExecutorSettings, MinhashSettings, SourceConfig
from v3flow.stages.pretrain.config import PretrainConfig

__all__ = ["DataConfig", "ExecutorSettings", "MinhashSettings", "ModelConfig", "PipelineConfig", "Section",
           "SourceConfig", "load_config", "section_hash"]


# ------------------------------------------------------------------------------------------ pipeline
class TrackingConfig(Section):
    experiment: str = "v3flow"
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; MLFLOW_TRACKING_URI wins when set.")


class PipelineConfig(Section):
    """The whole pipeline; one section per stage."""

    name: str
    seed: int = 1234
    workdir: str = Field("data/outputs", description="Stage outputs, content-addressed (relative: to the project).")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)

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

    def workdir_path(self) -> Path:
        path = Path(self.workdir)
        return path if path.is_absolute() else Path(self.project_root or ".") / path

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.project_root or ".") / p


# -------------------------------------------------------------------------------------------- loading
def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load, merge (`base:`), override (`key=value`) and validate a pipeline config."""
    path = Path(path).resolve()
    raw = _load_yaml_with_base(path, seen=())
    for item in overrides or []:
        _apply_override(raw, item)
    root = _project_root(path)
    _resolve_datasets(raw, root, path)
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err, path, overrides or [])) from None
    cfg.source_file = str(path)
    cfg.project_root = str(root)
    accelerate_config = cfg.pretrain.accelerate_config
    if cfg.pretrain.launcher == "accelerate" and not cfg.resolve(accelerate_config).is_file():
        raise ConfigError(f"{path}: pretrain.accelerate_config={accelerate_config!r}: no such file "
                          f"{cfg.resolve(accelerate_config)}")
    return cfg


def _project_root(config_path: Path) -> Path:
    for parent in config_path.parents:
        if (parent / "data" / "datasets").is_dir() or (parent / "pyproject.toml").is_file():
            return parent
    return Path.cwd()


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _load_yaml_with_base(path: Path, seen: tuple[Path, ...]) -> dict:
    if path in seen:
        raise ConfigError(f"{path}: `base:` cycle through {' -> '.join(map(str, seen))}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    return _deep_merge(_load_yaml_with_base((path.parent / base).resolve(), seen + (path,)), data)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _apply_override(raw: dict, item: str) -> None:
    """`a.b.c=value`: value is parsed as a YAML scalar/list; a numeric part indexes a list."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: cannot parse the value {text!r}") from None
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _step(node, part, ".".join(parts[: i + 1]), create=True)
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    else:
        node[last] = value


def _step(node: Any, part: str, where: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"override key {where}: {type(node).__name__} value has no sub-keys")
    if part not in node and create:
        node[part] = {}
    return node[part]


def _index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override key {where}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def _resolve_datasets(raw: dict, root: Path, config_path: Path) -> None:
    """Expand `data.mixture: NAME` (data/mixtures/NAME.yaml; it replaces data.sources), then replace each
    `{dataset: NAME, ...}` source entry by data/datasets/NAME.yaml merged with the entry."""
    data = raw.get("data") or {}
    if "mixture" in data:
        name = data.pop("mixture")
        definition = _definition(root, "mixtures", name, config_path, "data.mixture")
        data["sources"] = _read_yaml(definition).get("sources")
    sources = data.get("sources")
    if not isinstance(sources, list):
        return
    for i, entry in enumerate(sources):
        if isinstance(entry, dict) and "dataset" in entry:
            name = entry["dataset"]
            definition = _definition(root, "datasets", name, config_path, f"data.sources.{i}.dataset")
            merged = _deep_merge(_read_yaml(definition), {k: v for k, v in entry.items() if k != "dataset"})
            merged.setdefault("name", name)
            sources[i] = merged


def _definition(root: Path, kind: str, name: str, config_path: Path, key: str) -> Path:
    path = root / "data" / kind / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (root / "data" / kind).glob("*.yaml"))
        raise ConfigError(f"{config_path}: {key}={name!r}: no {path} (known: {known})")
    return path


def _explain(err: ValidationError, path: Path, overrides: list[str]) -> str:
    lines = _key_lines(path)
    out = [f"invalid config {path}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        where = f"line {lines[key]}" if key in lines else "from an override or a base file"
        if any(o.split("=", 1)[0] == key for o in overrides):
            where = "from --set"
        value = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(f"  {key}: {msg}{value} [{where}]")
    return "\n".join(out)


def _key_lines(path: Path) -> dict[str, int]:
    """Map dotted keys of a YAML file to their 1-based line numbers (for error messages)."""
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError):
        return {}
    found: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                found[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                found[f"{prefix}{i}"] = item.start_mark.line + 1
                walk(item, f"{prefix}{i}.")

    if root is not None:
        walk(root, "")
    return found
