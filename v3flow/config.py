"""The pipeline's one typed config: a pydantic model per stage, nested into `PipelineConfig`.

A config is a YAML file, optionally inheriting from another through `base: other.yaml`, plus command-line
overrides (`--set data.minhash.bands=20`). Everything is validated before any work starts: unknown keys,
wrong types and impossible combinations raise `ConfigError` naming the file, the line and the key.

Each section has a stable content hash (`section_hash`) that the flows use as the stage's cache key and
lineage tag. Fields that cannot change a stage's outputs (how many workers run it, where) are left out of
that hash, so moving a run from a laptop to Slurm reuses its results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from v3flow.errors import ConfigError
from v3flow.model.args import ModelConfig
from v3flow.section import Section, section_hash
from v3flow.stages.pretrain.config import PretrainConfig

__all__ = ["DataConfig", "ModelConfig", "PipelineConfig", "Section", "load_config", "section_hash"]


# --------------------------------------------------------------------------------------------- data
class SourceConfig(Section):
    """One corpus source. `dataset: NAME` pulls the rest of the fields from data/datasets/NAME.yaml."""

    name: str = Field(description="Short name, used in document ids and per-source statistics.")
    kind: Literal["stdlib", "jsonl", "parquet", "text", "hf_dataset"] = Field(
        description="stdlib: this Python's standard library sources (a real corpus on every machine); "
        "jsonl / parquet / text: a local file or folder; hf_dataset: a `datasets` folder saved with save_to_disk."
    )
    path: str | None = Field(None, description="File or folder; not used by `stdlib`.")
    glob: str | None = Field(None, description="Glob pattern of files inside `path` (default by kind).")
    include: list[str] = Field(default_factory=list, description="Only files matching one of these globs.")
    exclude: list[str] = Field(default_factory=list, description="Skip files matching any of these globs.")
    text_key: str = "text"
    id_key: str = "id"
    template: str | None = Field(
        None, description="Build the text from several fields, e.g. '{question}\\n{answer}' (jsonl/parquet)."
    )
    max_documents: int | None = Field(None, gt=0, description="Read at most this many documents.")
    weight: float = Field(
        1.0, gt=0, description="Sampling weight in the training mix: 2.0 uses each document twice, 0.5 half of "
        "them (seeded, per document). Validation keeps the natural distribution."
    )

    @model_validator(mode="after")
    def _path_needed(self) -> SourceConfig:
        if self.kind != "stdlib" and not self.path:
            raise ValueError(f"source '{self.name}' of kind {self.kind} needs a `path`")
        return self


class NormalizeConfig(Section):
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    strip_trailing_whitespace: bool = True
    max_consecutive_blank_lines: int = Field(2, ge=0)


class FilterConfig(Section):
    """Quality filters; a failing document goes to the quarantine file with the reason."""

    min_chars: int = Field(200, ge=0)
    max_chars: int = Field(1_000_000, gt=0, description="Larger documents are quarantined as oversized.")
    max_duplicate_line_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of non-blank lines that repeat an earlier line of the document."
    )
    max_top_line_fraction: float = Field(0.3, ge=0, le=1, description="Share of characters in the most common line.")
    min_text_char_fraction: float = Field(
        0.8, ge=0, le=1, description="Share of characters that are letters, digits, whitespace or punctuation."
    )

    @model_validator(mode="after")
    def _bounds(self) -> FilterConfig:
        if self.min_chars >= self.max_chars:
            raise ValueError(f"min_chars={self.min_chars} must be below max_chars={self.max_chars}")
        return self


class MinhashSettings(Section):
    """MinHash LSH near-dedup: `bands` buckets of `rows` hashes over word `n_grams`.

    A pair of documents with Jaccard similarity s collides in some band with probability
    1 - (1 - s^rows)^bands; the midpoint of that S-curve is about (1/bands)^(1/rows).
    FineWeb uses 5-grams, 14 bands x 8 rows (threshold ~0.72).
    """

    enabled: bool = True
    n_grams: int = Field(5, ge=1)
    bands: int = Field(14, ge=1)
    rows: int = Field(8, ge=1)
    seed: int = 1

    @property
    def threshold(self) -> float:
        return (1 / self.bands) ** (1 / self.rows)


class TokenizerSettings(Section):
    vocab_size: int = Field(
        4096, description="Byte-level BPE vocabulary incl. special tokens (DeepSeek-V3: 128K, 129,280 entries)."
    )
    min_frequency: int = Field(2, ge=1)
    max_training_chars: int = Field(
        200_000_000, gt=0, description="Train the BPE on at most this many characters of the deduplicated corpus."
    )

    @model_validator(mode="after")
    def _room_for_merges(self) -> TokenizerSettings:
        if self.vocab_size <= 512:
            raise ValueError(
                f"vocab_size={self.vocab_size} leaves no room for merges: byte-level BPE needs 256 byte tokens "
                "plus the special tokens; use at least 513"
            )
        return self


class PackingSettings(Section):
    seq_len: int = Field(512, ge=8, description="Tokens per training sequence (DeepSeek-V3: 4096).")
    fim_rate: float = Field(0.1, ge=0, le=1, description="Share of documents rearranged as PSM FIM (DeepSeek-V3: 0.1).")
    val_fraction: float = Field(0.02, gt=0, lt=1, description="Share of documents held out for validation.")
    sequences_per_shard: int = Field(8192, gt=0)
    seed: int = 1234


class SlurmSettings(Section):
    partition: str | None = None
    time: str = "12:00:00"
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: int = Field(2, ge=1)
    sbatch_args: dict[str, str] = Field(default_factory=dict)


class RaySettings(Section):
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: int = Field(2, ge=1)


class ExecutorSettings(Section):
    """Which datatrove executor runs the data steps. Only `tasks` changes outputs (it shards the corpus)."""

    unhashed: ClassVar[frozenset[str]] = frozenset({"kind", "workers", "slurm", "ray"})
    kind: Literal["local", "slurm", "ray"] = "local"
    tasks: int = Field(2, ge=1, description="Shards of the corpus; each step runs one task per shard.")
    workers: int = Field(2, ge=1, description="Tasks run at once (local executor).")
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    ray: RaySettings = Field(default_factory=RaySettings)

    @model_validator(mode="after")
    def _cluster_settings(self) -> ExecutorSettings:
        if self.kind == "slurm" and not self.slurm.partition:
            raise ValueError("executor kind 'slurm' needs slurm.partition")
        return self


class DataConfig(Section):
    """Data preparation: read, normalise, filter, exact + MinHash dedup, BPE, tokenize, pack (+FIM)."""

    unhashed: ClassVar[frozenset[str]] = frozenset()
    sources: list[SourceConfig] = Field(min_length=1)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    exact_dedup: bool = True
    minhash: MinhashSettings = Field(default_factory=MinhashSettings)
    tokenizer: TokenizerSettings = Field(default_factory=TokenizerSettings)
    packing: PackingSettings = Field(default_factory=PackingSettings)
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)

    @model_validator(mode="after")
    def _unique_source_names(self) -> DataConfig:
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique, repeated: {sorted(dup)}")
        return self


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
