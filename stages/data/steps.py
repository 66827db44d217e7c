"""The datatrove pipelines of the data stage and the executor that runs them.

Each pipeline runs under its own `logging_dir` (datatrove's completions/, stats/, logs/), so a stage that
was interrupted resumes with only its unfinished tasks. The executor comes from the config: local by
default, Slurm job arrays or Ray for clusters; all three block until the pipeline has finished, because
the next step (BPE training, packing) reads its output.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig

from stages.data.config import ExecutorSettings, MinhashSettings
from v3flow.errors import DataError


def doc_text(doc: Document) -> str:
    """What exact dedup hashes: the normalised text."""
    return doc.text


def run_pipeline(name: str, pipeline: list, tasks: int, ex: ExecutorSettings, logs: Path) -> list[dict]:
    """Run one datatrove pipeline to completion; returns its merged stats, keyed by step name."""
    logging_dir = logs / name
    if ex.kind == "local":
        LocalPipelineExecutor(
            # forkserver (datatrove's default), not fork: a forked child would inherit the Prefect task
            # thread's signal handlers and locks and can hang when the pool shuts down.
            pipeline, tasks=tasks, workers=min(ex.workers, tasks), logging_dir=str(logging_dir),
            start_method="forkserver",
        ).run()
    elif ex.kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        s = ex.slurm
        SlurmPipelineExecutor(
            pipeline, tasks=tasks, time=s.time, partition=s.partition, cpus_per_task=s.cpus_per_task,
            mem_per_cpu_gb=s.mem_per_cpu_gb, job_name=f"v3flow-{name}", sbatch_args=s.sbatch_args,
            logging_dir=str(logging_dir),
        ).run()
        _wait_for_completions(logging_dir, tasks)
    else:
        from datatrove.executor import RayPipelineExecutor

        RayPipelineExecutor(
            pipeline, tasks=tasks, workers=ex.workers, logging_dir=str(logging_dir),
            cpus_per_task=ex.ray.cpus_per_task, mem_per_cpu_gb=ex.ray.mem_per_cpu_gb,
        ).run()
    return read_stats(logging_dir)


def _wait_for_completions(logging_dir: Path, tasks: int, poll_s: float = 30) -> None:
    while len(list((logging_dir / "completions").glob("*"))) < tasks:
        time.sleep(poll_s)


def read_stats(logging_dir: Path) -> list[dict]:
    """datatrove's merged stats.json, in pipeline order, as [{"_name": step, stat: total, ...}]."""
    path = logging_dir / "stats.json"
    if not path.exists():
        raise DataError(f"datatrove wrote no stats for {logging_dir}: see {logging_dir / 'logs'}")
    out = []
    for step in json.loads(path.read_text()):
        totals = {k: (v["total"] if isinstance(v, dict) else v) for k, v in step.get("stats", {}).items()}
        timing = step.get("time_stats")
        seconds = timing.get("total", 0.0) if isinstance(timing, dict) else 0.0
        out.append({"_name": step["name"], "_seconds": seconds, **totals})
    return out


def jsonl_writer(folder: Path, prefix: str = "") -> JsonlWriter:
    return JsonlWriter(str(folder), output_filename=prefix + "${rank}.jsonl.gz")


def jsonl_reader(folder: Path) -> JsonlReader:
    return JsonlReader(str(folder), glob_pattern="*.jsonl.gz")


def exact_dedup_pipelines(src: Path, work: Path, out: Path, removed: Path) -> list[tuple[str, list, int | None]]:
    """(name, pipeline, tasks or None for the stage's default) of datatrove's three exact-dedup steps."""
    cfg = ExactDedupConfig(content_getter=doc_text, hash_config=HashConfig(precision=64))
    return [
        ("exact_1_signatures", [jsonl_reader(src), ExactDedupSignature(str(work / "sigs"), cfg)], None),
        ("exact_2_find", [ExactFindDedups(str(work / "sigs"), str(work / "dups"), cfg)], 1),
        ("exact_3_filter", [
            jsonl_reader(src),
            ExactDedupFilter(str(work / "dups"), cfg, exclusion_writer=jsonl_writer(removed)),
            jsonl_writer(out),
        ], None),
    ]


def minhash_pipelines(
    m: MinhashSettings, src: Path, work: Path, out: Path, removed: Path
) -> list[tuple[str, list, int | None]]:
    """datatrove's four MinHash steps: signatures, LSH buckets, clusters, filter (cluster ids kept)."""
    cfg = MinhashConfig(
        n_grams=m.n_grams, num_buckets=m.bands, hashes_per_bucket=m.rows, seed=m.seed,
        hash_config=HashConfig(precision=64),
    )
    return [
        ("minhash_1_signatures", [jsonl_reader(src), MinhashDedupSignature(str(work / "sigs"), config=cfg)], None),
        ("minhash_2_buckets", [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)], m.bands),
        ("minhash_3_clusters", [MinhashDedupCluster(
            str(work / "buckets"), str(work / "remove_ids"), config=cfg, save_cluster_id=True, save_cluster_size=True
        )], 1),
        ("minhash_4_filter", [
            jsonl_reader(src),
            MinhashDedupFilter(
                str(work / "remove_ids"), exclusion_writer=jsonl_writer(removed),
                load_cluster_ids=True, load_cluster_sizes=True,
            ),
            jsonl_writer(out),
        ], None),
    ]


class SplitFilter(BaseFilter):
    """Keeps the documents of one split; a document's split is a pure function of its id (stable)."""

    name = "🔀 split"

    def __init__(self, split: str, val_fraction: float, seed: int):
        super().__init__()
        self.split, self.val_fraction, self.seed = split, val_fraction, seed

    def filter(self, doc: Document) -> bool:
        return (split_of(doc.id, self.val_fraction, self.seed) == self.split)


def _uniform(*parts: object) -> float:
    """A deterministic number in [0, 1) from `parts` (stable across runs, machines and task counts)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def split_of(doc_id: str, val_fraction: float, seed: int) -> str:
    return "val" if _uniform(seed, doc_id) < val_fraction else "train"


class MixtureSampler(PipelineStep):
    """Applies the sources' mixture weights: a document of weight w is used floor(w) times, plus once more
    with probability frac(w) (decided by its id, so reruns sample the same documents)."""

    name = "⚖️ mixture weights"
    type = "🔀 - SAMPLER"

    def __init__(self, weights: dict[str, float], seed: int):
        super().__init__()
        self.weights, self.seed = weights, seed

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            w = self.weights.get(doc.metadata.get("source"), 1.0)
            copies = int(w) + (_uniform(self.seed, "mix", doc.id) < w - int(w))
            self.stat_update("copies", value=copies)
            for _ in range(copies):
                yield doc


def tokenize_pipeline(src: Path, split: str, out: Path, tokenizer_json: Path, eos: str, val_fraction: float,
                      seed: int, weights: dict[str, float]) -> list:
    sampler = [MixtureSampler(weights, seed)] if split == "train" and any(w != 1 for w in weights.values()) else []
    return [
        jsonl_reader(src),
        SplitFilter(split, val_fraction, seed),
        *sampler,
        DocumentTokenizer(
            str(out), tokenizer_name_or_path=str(tokenizer_json), eos_token=eos, seed=seed,
            shuffle_documents=True, save_final_metadata=True,
        ),
    ]
