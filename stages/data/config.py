"""Config of the data stage: sources, normalisation, filters, dedup, tokenizer, packing, executor.

Sources can be named rather than spelled out: `{dataset: NAME, ...}` takes its fields from
data/datasets/NAME.yaml, and `data.mixture: NAME` replaces the sources by data/mixtures/NAME.yaml
(`expand_sources`, applied while the YAML is loaded).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from v3flow.config import deep_merge, read_yaml
from v3flow.corpus import PackingSettings
from v3flow.errors import ConfigError
from v3flow.section import Section
from v3flow.tasks import TaskConfig


class SourceConfig(Section):
    """One corpus source. `dataset: NAME` pulls the rest of the fields from data/datasets/NAME.yaml."""

    name: str = Field(description="Short name, used in document ids and per-source statistics.")
    kind: Literal["stdlib", "jsonl", "parquet", "text", "hf_dataset", "task"] = Field(
        description="stdlib: this Python's standard library sources (a real corpus on every machine); "
        "jsonl / parquet / text: a local file or folder; hf_dataset: a `datasets` folder saved with save_to_disk; "
        "task: worked solutions of the post-training task's training split (never its held-out problems)."
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
    dedup: bool = Field(True, description="False: the source skips exact and MinHash dedup (synthetic "
                             "documents, unique by construction, whose shared vocabulary MinHash would cluster: "
                             "datatrove's MinHash also folds every digit to 0).")
    task: TaskConfig | None = Field(None, description="kind task: the task whose training problems are rendered; "
                                    "filled from posttrain.task, which it must match (else held-out problems could "
                                    "leak into pretraining).")
    per_document: int = Field(10, gt=0, description="kind task: worked problems per document.")

    @model_validator(mode="after")
    def _path_needed(self) -> SourceConfig:
        if self.kind not in ("stdlib", "task") and not self.path:
            raise ValueError(f"source '{self.name}' of kind {self.kind} needs a `path`")
        if self.kind == "task" and self.task is None:
            raise ValueError(f"source '{self.name}' of kind task needs a `task` (filled from posttrain.task)")
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
    digits_per_token: int = Field(3, ge=1, le=3, description="Numbers are split into groups of at most this many "
                                  "digits before BPE (DeepSeek-V3: 3; 1: every digit its own token, as LLaMA and "
                                  "DeepSeek LLM do, which small models need to learn arithmetic).")
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
    """Data preparation: read, normalise, filter, exact + MinHash dedup, BPE, tokenize; `packing` configures
    the `pack` stage that follows (and is not part of this stage's key)."""

    unhashed: ClassVar[frozenset[str]] = frozenset({"packing"})
    sources: list[SourceConfig] = Field(min_length=1)
    val_fraction: float = Field(0.02, gt=0, lt=1, description="Share of documents held out for validation.")
    seed: int = Field(1234, description="Seed of the train / validation split and the mixture sampling.")
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


def expand_sources(data: dict, root: Path, config_path: Path) -> None:
    """Expand `mixture: NAME` (data/mixtures/NAME.yaml; it replaces `sources`), then replace each
    `{dataset: NAME, ...}` source entry by data/datasets/NAME.yaml merged with the entry (in place, on the
    raw `data` section)."""
    if "mixture" in data:
        name = data.pop("mixture")
        data["sources"] = read_yaml(_definition(root, "mixtures", name, config_path, "data.mixture")).get("sources")
    sources = data.get("sources")
    if not isinstance(sources, list):
        return
    for i, entry in enumerate(sources):
        if isinstance(entry, dict) and "dataset" in entry:
            name = entry["dataset"]
            definition = _definition(root, "datasets", name, config_path, f"data.sources.{i}.dataset")
            merged = deep_merge(read_yaml(definition), {k: v for k, v in entry.items() if k != "dataset"})
            merged.setdefault("name", name)
            sources[i] = merged


def _definition(root: Path, kind: str, name: str, config_path: Path, key: str) -> Path:
    path = root / "data" / kind / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (root / "data" / kind).glob("*.yaml"))
        raise ConfigError(f"{config_path}: {key}={name!r}: no {path} (known: {known})")
    return path


def expand(raw: dict, root: Path, config_path: Path) -> None:
    """The data section's named sources and mixtures (`expand_sources`), and each task source's task: the
    config's posttrain.task with a train_size of its own (on the raw config, before validation)."""
    if not isinstance(raw.get("data"), dict):
        return
    expand_sources(raw["data"], root, config_path)
    posttrain = raw.get("posttrain") if isinstance(raw.get("posttrain"), dict) else {}
    task = posttrain.get("task") if isinstance(posttrain.get("task"), dict) else {"name": "arithmetic"}
    for source in raw["data"].get("sources") or []:
        if isinstance(source, dict) and source.get("kind") == "task":
            source["task"] = deep_merge(task, source.get("task") or {})


def held_out_problems_stay_out(cfg) -> None:
    """A task source may differ from the evaluated task (posttrain.task) in its train_size only: otherwise its
    documents could hold the held-out problems of the evaluation."""
    task = cfg.posttrain.task
    for i, src in enumerate(cfg.data.sources):
        if src.task is not None and src.task.model_copy(update={"train_size": task.train_size}) != task:
            raise ValueError(f"data.sources.{i}.task ({src.name}) differs from posttrain.task in more than "
                             "train_size: its documents could hold the held-out problems of the evaluation")


def digits_fit_the_task(cfg) -> None:
    """The arithmetic task's aligned layout writes numbers without spaces: each digit must be its own token."""
    task = cfg.posttrain.task
    if getattr(task, "layout", None) == "aligned" and cfg.data.tokenizer.digits_per_token != 1:
        raise ValueError(f"posttrain.task.layout=aligned writes numbers digit by digit without spaces, but "
                         f"data.tokenizer.digits_per_token={cfg.data.tokenizer.digits_per_token} merges digits into "
                         "one token; set it to 1 (or use layout: columns)")


def task_documents_pass_the_filters(cfg) -> None:
    """Worked problems are documents of `per_document` problems; a document shorter than the quality filter's
    minimum would be quarantined, every one of them (a corpus without its task, found only in the funnel)."""
    f = cfg.data.filters
    for i, src in enumerate(cfg.data.sources):
        if src.task is None or src.task.name != "arithmetic":  # GSM8K's worked solutions are paragraphs
            continue
        shortest = _shortest_problem(src.task.model_dump_json())
        if shortest * src.per_document < f.min_chars:
            raise ValueError(f"data.sources.{i} ({src.name}): a document of per_document={src.per_document} worked "
                             f"problems can be {shortest * src.per_document} characters, below data.filters.min_chars="
                             f"{f.min_chars}: such documents would be quarantined as too short; raise per_document or "
                             "lower min_chars")


@functools.cache
def _shortest_problem(settings: str) -> int:
    """Characters of the shortest worked training problem of an arithmetic task (its settings as JSON)."""
    from v3flow.tasks import build
    from v3flow.tasks.arithmetic import ArithmeticSettings

    task = build(ArithmeticSettings.model_validate_json(settings))
    return min(len(task.document([p])) for p in task.problems("train"))
