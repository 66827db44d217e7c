"""The data stage's numbers: per-step document counts, duplicates, tokens per split, timing."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from stages.data.config import DataConfig
from stages.data.readers import read_documents


def _step(stats: list[dict], kind: str) -> dict:
    """Totals of the first step whose name contains `kind` (datatrove names steps 'TYPE: name')."""
    return next((s for s in stats if kind in s["_name"]), {})


def metrics(stats: dict[str, list[dict]], tokens: dict, seconds: dict[str, float], cfg: DataConfig) -> dict[str, float]:
    m: dict[str, float] = {}
    read = stats.get("read_filter", []) + stats.get("read_filter_undeduped", [])
    readers = [s for s in read if "READER" in s["_name"]]
    m["docs_read"] = sum(s.get("documents", 0) for s in readers)
    m["input_bytes"] = sum(s.get("doc_len", 0) for s in readers)  # characters of accepted text
    for s in readers:
        for k, v in s.items():
            if k.startswith("quarantined_"):
                m[k] = m.get(k, 0) + v
    m["quarantined"] = sum(v for k, v in m.items() if k.startswith("quarantined_"))
    m["filtered"] = m["docs_after_filters"] = 0
    for quality in (_step(stats.get(name, []), "quality") for name in ("read_filter", "read_filter_undeduped")):
        m["filtered"] += quality.get("dropped", 0)
        m["docs_after_filters"] += quality.get("forwarded", 0)
        for k, v in quality.items():
            if k.startswith("dropped_"):
                key = f"filtered_{k.removeprefix('dropped_')}"
                m[key] = m.get(key, 0) + v
    undeduped = _step(stats.get("read_filter_undeduped", []), "quality").get("forwarded", 0)
    if undeduped:
        m["docs_not_deduplicated"] = undeduped  # sources with dedup off
    if "exact_3_filter" in stats:
        f = _step(stats["exact_3_filter"], "exact-deduplication")
        m["exact_duplicates_removed"] = f.get("dropped", 0)
        m["docs_after_exact_dedup"] = f.get("forwarded", 0) + undeduped
    if "minhash_4_filter" in stats:
        f = _step(stats["minhash_4_filter"], "MinHash")
        m["near_duplicates_removed"] = f.get("dropped", 0)
        m["docs_after_near_dedup"] = f.get("forwarded", 0) + undeduped
        m["minhash_threshold"] = cfg.minhash.threshold
    for split, info in tokens["splits"].items():
        m[f"{split}_documents"] = info["documents"]
        m[f"{split}_tokens"] = info["tokens"]
    m["tokens"] = sum(info["tokens"] for info in tokens["splits"].values())
    for name, sec in seconds.items():
        m[f"time_{name}_s"] = sec
    m["time_total_s"] = sum(seconds.values())
    m["throughput_mb_s"] = m["input_bytes"] / 1e6 / max(m["time_total_s"], 1e-9)
    return m


def write_tokens_info(folder: Path, splits: dict[str, Path], vocab_size: int, tok_sha: str,
                      special: dict[str, int]) -> dict:
    """tokens.json beside the token files: what a packer needs (token width, special ids) and the documents
    and tokens of each split, read from datatrove's `.ds.index` files (uint64 end offsets of the documents)."""
    counts = {}
    for split, path in splits.items():
        ends = [np.fromfile(index, dtype=np.uint64) for index in sorted(path.glob("*.ds.index"))]
        counts[split] = {"path": path.name, "documents": int(sum(len(e) for e in ends)),
                         "tokens": int(sum(int(e[-1]) for e in ends if len(e)))}
    body = {"format": "datatrove-ds", "token_size": 4 if vocab_size > 65536 else 2, "vocab_size": vocab_size,
            "tokenizer_sha256": tok_sha, "special_tokens": special, "splits": counts}
    body["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (folder / "tokens.json").write_text(json.dumps(body, indent=2))
    return body


def largest_clusters(removed_near: Path, kept: Path, top: int = 10) -> list[dict]:
    """The largest MinHash duplicate clusters: size, the kept document and examples of removed ones."""
    removed = defaultdict(list)
    for doc in read_documents(removed_near):
        removed[doc.metadata.get("minhash_cluster_id", -1)].append(doc)
    if not removed:
        return []
    keepers = {}
    for doc in read_documents(kept):
        cid = doc.metadata.get("minhash_cluster_id", -1)
        if cid in removed:
            keepers[cid] = doc
    out = []
    for cid, docs in sorted(removed.items(), key=lambda kv: -len(kv[1]))[:top]:
        keeper = keepers.get(cid)
        out.append({
            "cluster_id": cid,
            "size": len(docs) + (keeper is not None),
            "kept": keeper.id if keeper else None,
            "kept_snippet": keeper.text[:160] if keeper else None,
            "removed_examples": [d.id for d in docs[:5]],
        })
    return out


def markdown(m: dict[str, float], clusters: list[dict], tokens: dict) -> str:
    """The stage's Prefect artifact: a table of the key numbers and the largest duplicate clusters."""
    rows = [
        ("documents read", m["docs_read"]), ("quarantined (bad input)", m["quarantined"]),
        ("rejected by quality filters", m["filtered"]), ("after filters", m["docs_after_filters"]),
        ("exact duplicates removed", m.get("exact_duplicates_removed", "off")),
        ("near duplicates removed", m.get("near_duplicates_removed", "off")),
        ("train / val documents", f"{m['train_documents']:.0f} / {m['val_documents']:.0f}"),
        ("train / val tokens", f"{m['train_tokens']:,.0f} / {m['val_tokens']:,.0f}"),
        ("throughput", f"{m['throughput_mb_s']:.2f} MB/s over {m['time_total_s']:.1f} s"),
    ]
    lines = ["## Data stage", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v:,.0f} |" if isinstance(v, float | int) else f"| {k} | {v} |" for k, v in rows]
    lines += ["", (f"Tokenizer `{tokens['tokenizer_sha256'][:16]}`, vocab {tokens['vocab_size']}; tokens "
                  f"`{tokens['sha256'][:16]}`. Packed into training sequences by the `pack` stage.")]
    if clusters:
        lines += ["", "### Largest near-duplicate clusters", "", "| size | kept | removed (examples) |", "|---|---|---|"]
        lines += [f"| {c['size']} | `{c['kept']}` | {', '.join(f'`{r}`' for r in c['removed_examples'][:3])} |"
                  for c in clusters]
    return "\n".join(lines)
