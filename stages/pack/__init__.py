"""Pack stage: the data stage's tokenized documents in, fixed-length training sequences out (report §4.1).

Documents are laid back to back, each ending in EOS, a `fim_rate` share rearranged as Prefix-Suffix-Middle
(packing.py), and cut into `seq_len` sequences stored as memory-mappable uint32 `.npy` shards. Its key is the
data stage's plus the packing settings, so packing one corpus at another length (context extension: 4K ->
32K -> 128K) reuses the deduplicated, tokenized corpus.

    packed/      train_NNNNN.npy, val_NNNNN.npy ([sequences, seq_len] uint32) and manifest.json
    tokenizer/   the corpus's tokenizer (a copy: a packed dataset is self-contained)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from stages.pack import packing
from v3flow.corpus import PackingSettings
from v3flow.stage import StageResult, StageSpec

STAGE = "pack"


def spec(name: str = STAGE, section=lambda cfg, wiring: cfg.data.packing,
         headline: tuple[str, ...] = ("train_tokens", "train_sequences", "packing_efficiency"),
         phase: str = "") -> StageSpec:
    """A pack stage: the data stage's corpus (role `corpus`) packed with the PackingSettings `section` gives (the
    config's data.packing; context extension's phases pack the same corpus at their lengths)."""
    return StageSpec(name, __name__, section, settings={"data.packing": PackingSettings}, inputs={"corpus": "data"},
                     libraries=("numpy",), headline=headline, phase=phase)


SPEC = spec()


def run(cfg: PackingSettings, out_dir: Path, inputs: dict[str, StageResult], resolve=Path) -> StageResult:
    """Pack `inputs["corpus"]` (a data stage result) at `cfg.seq_len` into `out_dir`."""
    corpus = inputs["corpus"]
    out_dir = Path(out_dir)
    tokens = json.loads((Path(corpus.outputs["tokens"]) / "tokens.json").read_text())
    ids = tokens["special_tokens"]
    fim = packing.FimTokens(ids["fim_begin"], ids["fim_hole"], ids["fim_end"], ids["eos"])
    packed = out_dir / "packed"
    shutil.rmtree(packed, ignore_errors=True)  # an interrupted packing starts over (seconds, deterministic)
    splits = {}
    for i, (split, info) in enumerate(tokens["splits"].items()):  # train, then val
        packer = packing.Packer(packed, split, cfg.seq_len, cfg.sequences_per_shard, ids["pad"])
        ds_files = sorted((Path(corpus.outputs["tokens"]) / info["path"]).glob("*.ds"))
        upsample = {"long_share": cfg.long_share, "long_min_tokens": cfg.long_min_tokens or cfg.seq_len} \
            if split == "train" and cfg.long_share is not None else {}  # held-out documents stay as they are
        splits[split] = packing.pack_split(ds_files, tokens["token_size"], packer, fim, cfg.fim_rate, cfg.seed + i,
                                           **upsample)
    entropy = packing.unigram_entropy([packed / s["path"] for s in splits["train"].shards], tokens["vocab_size"],
                                      ids["pad"])
    manifest = packing.write_manifest(packed, cfg, splits, tokens, entropy)
    tok_dir = out_dir / "tokenizer"
    shutil.copytree(corpus.outputs["tokenizer"], tok_dir, dirs_exist_ok=True)

    m: dict[str, float] = {}
    for split, s in splits.items():
        m.update({f"{split}_documents": s.documents, f"{split}_fim_documents": s.fim_documents,
                  f"{split}_tokens": s.tokens, f"{split}_sequences": s.sequences, f"{split}_pad_tokens": s.pad_tokens})
    total = sum(s.tokens for s in splits.values())
    m.update({"tokens": total, "seq_len": cfg.seq_len, "train_unigram_entropy_nats": entropy,
              "packing_efficiency": total / max(1, total + sum(s.pad_tokens for s in splits.values()))})
    result = StageResult(
        stage=STAGE, key=out_dir.name, out_dir=str(out_dir),
        outputs={"packed": str(packed), "manifest": str(packed / "manifest.json"), "tokenizer": str(tok_dir)},
        metrics=m,
        params={"manifest_sha256": manifest["sha256"], "tokenizer_sha256": tokens["tokenizer_sha256"],
                "tokens_sha256": tokens["sha256"]},
        artifacts=[str(packed / "manifest.json")],
    )
    up = splits["train"].upsampling
    if up:
        m.update({f"train_{k}": float(v) for k, v in up.items()})
    result.report_md = "\n".join([
        "## Packing", "", "| | |", "|---|---|",
        f"| sequence length | {cfg.seq_len:,} tokens |",
        f"| train / val sequences | {m['train_sequences']:,} / {m['val_sequences']:,} |",
        f"| train / val tokens (with FIM sentinels) | {m['train_tokens']:,} / {m['val_tokens']:,} |",
        f"| FIM documents (rate {cfg.fim_rate}) | {m['train_fim_documents']:,} of {m['train_documents']:,} |",
        f"| packing efficiency | {m['packing_efficiency']:.4%} |",
        f"| unigram entropy (train) | {entropy:.3f} nats |",
        *([(f"| long documents (>= {up['long_min_tokens']:,} tokens) | {up['long_documents']:,}, "
            f"{up['long_share_natural']:.1%} of tokens, repeated x{up['long_repeat']:.2f} to "
            f"{up['long_share_upsampled']:.1%} (asked: at least {cfg.long_share:.0%}) |")] if up else []),
        "", f"Manifest `{manifest['sha256'][:16]}`, tokenizer `{tokens['tokenizer_sha256'][:16]}`.",
    ])
    return result
