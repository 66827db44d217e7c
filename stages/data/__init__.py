"""Data stage: a real corpus in, a tokenizer and the tokenized train / validation documents out.

    read (quarantining) -> normalise -> quality filters -> exact dedup -> MinHash near-dedup
    -> byte-level BPE -> tokenize (train / val by document, mixture weights on train)

Every step but BPE training is a datatrove pipeline run by the executor named in the config (local, Slurm
or Ray). Packing into training sequences is the `pack` stage's (stages/pack), cached apart: packing the same
corpus at another sequence length (context extension) neither reruns MinHash nor retrains the tokenizer.
Run it on its own with

    python -m stages.data configs/tiny.yaml OUT_DIR

Layout of the output folder:
    quarantine/        bad input records with file, line and reason
    filtered/          documents rejected by the quality filters (metadata.filter_reason)
    removed_exact/     exact duplicates;  removed_near/  MinHash near duplicates (with cluster ids)
    tokenizer/         tokenizer.json + tokenizer_config.json (HF format)
    tokens/            train/ and val/: datatrove's token files (*.ds + *.ds.index document ends), and
                       tokens.json (token width, special ids, documents and tokens per split)
    datatrove/         datatrove logs, stats and completions (resume state)
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from stages.data import bpe, readers, report, steps
from stages.data.config import (
    DataConfig,
    digits_fit_the_task,
    expand,
    held_out_problems_stay_out,
    task_documents_pass_the_filters,
)
from stages.data.quality import Normalizer, QualityFilter
from v3flow.cache import files_fingerprint
from v3flow.errors import DataError
from v3flow.stage import StageResult, StageSpec

STAGE = "data"
SPEC = StageSpec(
    STAGE, __name__, lambda cfg, wiring: cfg.data, settings={"data": (DataConfig, ...)},
    libraries=("datatrove", "tokenizers", "transformers", "spacy", "numpy"),
    headline=("docs_read", "quarantined", "docs_after_filters", "docs_after_exact_dedup", "train_documents",
              "train_tokens", "throughput_mb_s"),
    report=("funnel",), checks=(held_out_problems_stay_out, digits_fit_the_task, task_documents_pass_the_filters),
    expand=expand)


def fingerprint(cfg: DataConfig, resolve) -> str:
    """Fingerprint of the input files: part of the stage's cache key, so changed sources rerun the stage."""
    parts = []
    for src in cfg.sources:
        root = readers.source_root(src, resolve)
        parts.append(files_fingerprint(root, readers.list_source_files(src, root)))
    return "-".join(parts)


class _Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        print(f"[data] {name} ...", flush=True)
        yield
        self.seconds[name] = time.perf_counter() - start
        print(f"[data] {name} done in {self.seconds[name]:.1f}s", flush=True)


def _read_filter(sources: list, cfg: DataConfig, out_dir: Path, work: Path, prefix: str, resolve) -> list:
    """Read (quarantining), normalise, filter; kept documents to work/clean, or work/undeduped with `prefix`."""
    pipeline = []
    for src in sources:
        root = readers.source_root(src, resolve)
        paths_file = None
        if src.kind not in ("hf_dataset", "task"):
            paths_file = work / "paths" / f"{src.name}.txt"
            paths_file.parent.mkdir(parents=True, exist_ok=True)
            paths_file.write_text("\n".join(readers.list_source_files(src, root)) + "\n")
        pipeline.append(readers.make_reader(src, root, paths_file, str(out_dir / "quarantine"),
                                            cfg.filters.max_chars))
    return pipeline + [
        Normalizer(cfg.normalize),
        QualityFilter(cfg.filters, exclusion_writer=steps.jsonl_writer(out_dir / "filtered", prefix)),
        steps.jsonl_writer(work / ("undeduped" if prefix else "clean"), prefix),
    ]


def run(cfg: DataConfig, out_dir: Path, inputs: dict | None = None, resolve=Path) -> StageResult:
    """Run the data stage into `out_dir` (it has no upstream `inputs`); `resolve` makes config paths absolute."""
    out_dir = Path(out_dir)
    logs, work = out_dir / "datatrove", out_dir / "work"
    tasks, ex = cfg.executor.tasks, cfg.executor
    timer, stats = _Timer(), {}

    # Sources with dedup off (synthetic, unique by construction) are read apart and skip both dedups.
    groups = {"read_filter": [s for s in cfg.sources if s.dedup],
              "read_filter_undeduped": [s for s in cfg.sources if not s.dedup]}
    with timer("read_filter"):
        for name, sources in groups.items():
            if sources:
                prefix = "" if name == "read_filter" else "undeduped_"
                pipe = _read_filter(sources, cfg, out_dir, work, prefix, resolve)
                stats[name] = steps.run_pipeline(name, pipe, tasks, ex, logs)
    current, undeduped = work / "clean", sorted((work / "undeduped").glob("*.jsonl.gz"))  # (named undeduped_*)
    if not any(current.glob("*.jsonl.gz")) and not undeduped:
        raise DataError(f"no document passed the quality filters: see {out_dir / 'quarantine'} and "
                        f"{out_dir / 'filtered'} for why (config keys data.filters.*)")

    if cfg.exact_dedup and groups["read_filter"]:
        with timer("exact_dedup"):
            for name, pipe, n in steps.exact_dedup_pipelines(current, work / "exact", work / "exact_kept",
                                                             out_dir / "removed_exact"):
                stats[name] = steps.run_pipeline(name, pipe, n or tasks, ex, logs)
        current = work / "exact_kept"

    if cfg.minhash.enabled and groups["read_filter"]:
        with timer("minhash_dedup"):
            for name, pipe, n in steps.minhash_pipelines(cfg.minhash, current, work / "minhash",
                                                         work / "deduped", out_dir / "removed_near"):
                stats[name] = steps.run_pipeline(name, pipe, n or tasks, ex, logs)
        current = work / "deduped"
    current.mkdir(parents=True, exist_ok=True)
    for path in undeduped:  # joined after dedup, under names datatrove's writers do not use
        shutil.copyfile(path, current / path.name)

    with timer("train_tokenizer"):
        texts = (doc.text for doc in readers.read_documents(current))
        tok = bpe.train_bpe(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency,
                            cfg.tokenizer.max_training_chars, cfg.tokenizer.digits_per_token)
        tok_dir = out_dir / "tokenizer"
        tok_sha = bpe.save_tokenizer(tok, tok_dir)

    token_dirs = {split: out_dir / "tokens" / split for split in ("train", "val")}
    with timer("tokenize"):
        for split, folder in token_dirs.items():
            pipe = steps.tokenize_pipeline(current, split, folder, tok_dir / "tokenizer.json", bpe.EOS,
                                           cfg.val_fraction, cfg.seed, {src.name: src.weight for src in cfg.sources})
            stats[f"tokenize_{split}"] = steps.run_pipeline(f"tokenize_{split}", pipe, tasks, ex, logs)
        tokens = report.write_tokens_info(out_dir / "tokens", token_dirs, tok.get_vocab_size(), tok_sha,
                                          bpe.special_ids(tok))

    metrics = report.metrics(stats, tokens, timer.seconds, cfg)
    clusters = report.largest_clusters(out_dir / "removed_near", current, top=10)
    (out_dir / "report").mkdir(exist_ok=True)
    (out_dir / "report" / "clusters.json").write_text(json.dumps(clusters, indent=2, ensure_ascii=False))
    (out_dir / "report" / "step_stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    result = StageResult(
        stage=STAGE, key=out_dir.name, out_dir=str(out_dir),
        outputs={"tokens": str(out_dir / "tokens"), "tokenizer": str(tok_dir), "quarantine": str(out_dir / "quarantine")},
        metrics=metrics,
        params={"tokenizer_sha256": tok_sha, "tokens_sha256": tokens["sha256"]},
        artifacts=[str(out_dir / "tokens" / "tokens.json"), str(tok_dir / "tokenizer.json"),
                   str(tok_dir / "tokenizer_config.json"), str(out_dir / "report" / "clusters.json"),
                   str(out_dir / "report" / "step_stats.json")],
    )
    result.report_md = report.markdown(metrics, clusters, tokens)
    return result
