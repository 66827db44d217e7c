"""Long-context evaluation stage: what context extension bought, and what it cost, in four arms.

    base        the pretrained model as it is (RoPE as trained, positions past its length never seen)
    base_yarn   the same weights with YaRN switched on, untrained (what YaRN alone does)
    phase1      after the first extension phase
    phase2      after the second

Each arm is measured on the data stage's held-out documents (v3flow/evaluation/long_context.py):
- loss by position bucket (0-L, L-2L, ... up to phase 2's length) with the full context, and with the
  context cut to the pretraining length L (windows of L tokens, each scoring its second half). Their
  difference, the context gain, is what the tokens past L bring: negative when a model uses them,
  positive when they confuse it;
- passkey retrieval over lengths x depths (greedy exact match; the key's log-probability and rank
  against random keys), with the prompts saved;
- the short-context regression: validation loss of the packed validation sequences at length L.

Everything lands in the stage's MLflow run: metrics, the tables (per bucket, per passkey prompt), and
figures (loss by position, one passkey heatmap per arm).
"""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from v3flow import training
from v3flow.corpus import read_ds_documents
from v3flow.evaluation import long_context as lc
from v3flow.model.args import YarnConfig
from v3flow.model.attention import set_attention_kernel
from v3flow.model.transformer import IGNORE, Transformer
from v3flow.section import Section
from v3flow.stage import StageResult, StageSpec
from v3flow.training import artifact
from v3flow.training.data import PackedSequences
from v3flow.training.recipe import AttentionKernel

STAGE = "long_eval"
ARMS = ("base", "base_yarn", "phase1", "phase2")


class LongEvalSettings(Section):
    """The config's `extension.eval`: the four-arm long-context evaluation (v3flow/evaluation/long_context.py)."""

    documents: int = Field(16, gt=0, description="Held-out documents (the data stage's validation split) at least "
                           "as long as the longest bucket; loss by position is averaged over them.")
    passkey_depths: list[float] = Field([0.1, 0.5, 0.9], description="Needle depths (share of the haystack).")
    passkey_trials: int = Field(2, gt=0, description="Prompts per (length, depth), each with its own key.")
    distractors: int = Field(9, gt=0, description="Random keys the true key is ranked against.")
    short_sequences: int = Field(256, gt=0, description="Packed validation sequences at the pretraining length "
                                 "(at most) for the short-context regression.")
    seed: int = 1234


class LongEvalConfig(Section):
    short_len: int  # the pretraining length L
    long_len: int  # phase 2's length: the longest bucket and passkey prompt
    yarn: YarnConfig
    attention: AttentionKernel
    settings: LongEvalSettings


def section(cfg, wiring) -> LongEvalConfig:
    """Measured at the pretraining length and phase 2's, with the extension's YaRN and attention kernel."""
    ext = cfg.extension
    return LongEvalConfig(short_len=cfg.data.packing.seq_len, long_len=ext.phase2.seq_len, yarn=ext.yarn,
                          attention=ext.attention, settings=ext.eval)


SPEC = StageSpec(
    STAGE, __name__, section, settings={"extension.eval": LongEvalSettings},
    inputs={"base": "pretrain", "phase1": "extend_phase1", "phase2": "extend_phase2", "corpus": "data",
            "short": "pack"},
    libraries=(*training.LIBRARIES, "tokenizers", "matplotlib"),
    headline=tuple(f"{arm}.{m}" for arm in ("base", "phase1", "phase2") for m in (
        "passkey_exact_match", "passkey_top1", "short_val_loss", "loss.2048-4096")) + ("short_val_loss_delta",),
    phase="extend", report=("long_context",))


def run(cfg: LongEvalConfig, out_dir: Path, inputs: dict[str, StageResult], resolve=Path) -> StageResult:
    from tokenizers import Tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s, device = cfg.settings, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    corpus = inputs["corpus"]
    tokenizer = Tokenizer.from_file(str(Path(corpus.outputs["tokenizer"]) / "tokenizer.json"))
    held_out = held_out_documents(Path(corpus.outputs["tokens"]))
    long_docs = [torch.from_numpy(d.astype(np.int64)) for d in held_out if len(d) > cfg.long_len][: s.documents]
    if not long_docs:
        raise ValueError(f"{STAGE}: no held-out document of the corpus has more than {cfg.long_len} tokens "
                         "(extension.phase2.seq_len); raise data.val_fraction or add longer documents")
    edges = lc.bucket_edges(cfg.short_len, cfg.long_len)
    haystack = [tokenizer.decode(d.tolist()) for d in held_out[: 4 * s.documents]]
    prompts = lc.passkey_prompts(tokenizer, haystack, edges[1:], s.passkey_depths, s.passkey_trials, s.seed)
    short = PackedSequences(Path(inputs["short"].outputs["manifest"]), "val")
    short_rows = short.rows(np.arange(min(s.short_sequences, short.size)))

    positions, passkey, summary = [], [], {}
    for arm in ARMS:
        model = arm_model(arm, inputs, cfg).to(device).eval()
        set_attention_kernel(model, cfg.attention)
        full = lc.position_losses(model, long_docs, edges)
        cut = windowed_losses(model, long_docs, edges, cfg.short_len)
        for bucket, v in full.items():
            positions.append({"arm": arm, "bucket": bucket, "loss": v["loss"], "loss_context_cut": cut[bucket],
                              "context_gain": v["loss"] - cut[bucket], "tokens": v["tokens"]})
        records = [{"arm": arm, **r} for r in lc.passkey_grid(model, tokenizer, prompts, s.distractors)]
        passkey += records
        summary[arm] = {**{f"loss.{b}": v["loss"] for b, v in full.items()},
                        **{f"context_gain.{b}": v["loss"] - cut[b] for b, v in full.items() if b in cut},
                        **lc.summarize(records), "short_val_loss": short_loss(model, short, short_rows, device)}
        del model

    first, last = lc.bucket_name(*edges[:2]), lc.bucket_name(*edges[-2:])
    metrics = {f"{arm}.{k}": float(v) for arm, m in summary.items() for k, v in m.items()}
    metrics.update({
        "short_val_loss_delta": summary["phase2"]["short_val_loss"] - summary["base"]["short_val_loss"],
        "phase2_last_minus_first_bucket": summary["phase2"][f"loss.{last}"] - summary["phase2"][f"loss.{first}"],
        "documents": len(long_docs), "passkey_prompts": len(prompts)})

    files = write_outputs(out_dir, positions, passkey, prompts, tokenizer, edges, cfg)
    result = StageResult(stage=STAGE, key=out_dir.name, out_dir=str(out_dir), metrics=metrics,
                         outputs={"positions": str(files["positions"]), "passkey": str(files["passkey"]),
                                  "prompts": str(files["prompts"])},
                         artifacts=[str(p) for name, p in files.items() if name not in ("positions", "passkey")],
                         tables={"long_eval/positions.json": str(files["positions"]),
                                 "long_eval/passkey.json": str(files["passkey"])})
    result.report_md = report(summary, positions, edges, cfg, len(long_docs), len(prompts), metrics)
    return result


def held_out_documents(tokens_dir: Path) -> list[np.ndarray]:
    """The data stage's validation documents, longest first (ties in file order)."""
    info = json.loads((tokens_dir / "tokens.json").read_text())
    docs = [np.asarray(d) for f in sorted((tokens_dir / info["splits"]["val"]["path"]).glob("*.ds"))
            for d in read_ds_documents(f, info["token_size"])]
    return sorted(docs, key=len, reverse=True)


def arm_model(arm: str, inputs: dict[str, StageResult], cfg: LongEvalConfig) -> Transformer:
    """The arm's weights, built for sequences of `long_len` tokens: the base model without and with YaRN, the
    extended models with the YaRN they were trained with."""
    source = Path(inputs["base" if arm.startswith("base") else arm].outputs["model"])
    have = artifact.model_config(source)
    yarn = {"base": None, "base_yarn": cfg.yarn}.get(arm, have.yarn)
    return artifact.load_model(source, have.model_copy(update={"max_seq_len": cfg.long_len, "yarn": yarn}))


@torch.no_grad()
def windowed_losses(model: Transformer, documents: list[torch.Tensor], edges: list[int], window: int) -> dict:
    """Per bucket: the loss when every token sees at most `window` tokens (and at least half of that) of
    context: windows of `window` tokens every `window / 2`, each scoring its second half (the first
    window scores all of its tokens, as the full-context pass does there)."""
    length, half = edges[-1], window // 2
    device = next(model.parameters()).device
    sums, counts = torch.zeros(length, dtype=torch.float64), torch.zeros(length, dtype=torch.float64)
    for doc in documents:
        seq = doc[: length + 1].to(device)
        for start in range(0, length - half, half):
            chunk = seq[start: start + window + 1]
            nll = F.cross_entropy(model(chunk[None, :-1])[0].float(), chunk[1:], reduction="none").double().cpu()
            keep = 0 if start == 0 else half
            sums[start + keep: start + len(nll)] += nll[keep:]
            counts[start + keep: start + len(nll)] += 1
    return {lc.bucket_name(lo, hi): float(sums[lo:hi].sum() / counts[lo:hi].sum()) for lo, hi in
            pairwise(edges)}


@torch.no_grad()
def short_loss(model: Transformer, data: PackedSequences, rows: torch.Tensor, device, batch: int = 8) -> float:
    """Mean next-token loss of packed validation sequences (padding excluded), as pretraining evaluates."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        inputs, targets = data.inputs_targets(rows[i: i + batch].to(device))
        logits, valid = model(inputs), targets != IGNORE
        total += float(F.cross_entropy(logits[valid].float(), targets[valid], reduction="sum"))
        count += int(valid.sum())
    return total / max(count, 1)


def write_outputs(out_dir: Path, positions: list[dict], passkey: list[dict], prompts: list, tokenizer,
                  edges: list[int], cfg: LongEvalConfig) -> dict[str, Path]:
    files = {"positions": out_dir / "positions.json", "passkey": out_dir / "passkey.json",
             "prompts": out_dir / "passkey_prompts.jsonl", "figure": out_dir / "loss_by_position.png"}
    files["positions"].write_text(json.dumps(positions, indent=1))
    files["passkey"].write_text(json.dumps(passkey, indent=1))
    with files["prompts"].open("w") as f:
        for p in prompts:
            f.write(json.dumps({**p.record(), "prompt": tokenizer.decode(p.prompt_ids)}) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mids = [(lo + hi) / 2 for lo, hi in pairwise(edges)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, arm in enumerate(ARMS):
        rows = [r for r in positions if r["arm"] == arm]
        ax.plot(mids, [r["loss"] for r in rows], "o-", color=f"C{i}", label=arm)
        ax.plot(mids, [r["loss_context_cut"] for r in rows], ":", color=f"C{i}", alpha=0.6)
    ax.axvline(cfg.short_len, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position (bucket middle, tokens)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(f"loss by position; dotted: context cut to {cfg.short_len} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(files["figure"], dpi=110)
    plt.close(fig)
    for arm in ARMS:
        fig = lc.heatmap([r for r in passkey if r["arm"] == arm], "rank", f"passkey, {arm}: mean rank of the key "
                         f"(1 = best, chance {(cfg.settings.distractors + 2) / 2:g})")
        files[f"heatmap_{arm}"] = out_dir / f"passkey_rank_{arm}.png"
        fig.savefig(files[f"heatmap_{arm}"], dpi=110)
        plt.close(fig)
    return files


def report(summary: dict, positions: list[dict], edges: list[int], cfg: LongEvalConfig, documents: int,
           prompts: int, metrics: dict) -> str:
    buckets = [lc.bucket_name(lo, hi) for lo, hi in pairwise(edges)]
    cell = {(r["arm"], r["bucket"]): r for r in positions}
    lines = [f"## Long-context evaluation: {cfg.short_len:,} -> {cfg.long_len:,} tokens", "",
             (f"Loss by position (nats) on {documents} held-out documents; in brackets the context gain, full "
              f"context minus context cut to {cfg.short_len:,} tokens (negative: the extra context helps)."), "",
             "| arm | " + " | ".join(buckets) + " | short val loss |", "|---" * (len(buckets) + 2) + "|"]
    for arm in ARMS:
        lines.append(f"| {arm} | " + " | ".join(
            f"{cell[arm, b]['loss']:.3f} ({cell[arm, b]['context_gain']:+.3f})" for b in buckets)
            + f" | {summary[arm]['short_val_loss']:.4f} |")
    lines += ["", (f"Passkey retrieval, {prompts} prompts per arm (lengths {edges[1:]} x depths "
                   f"{cfg.settings.passkey_depths}): exact match, top-1 among {cfg.settings.distractors + 1} keys, "
                   "mean rank, log-probability of the key per token."), "",
              "| arm | exact match | top-1 | mean rank | key log-prob |", "|---|---|---|---|---|"]
    for arm in ARMS:
        m = summary[arm]
        lines.append(f"| {arm} | {m['passkey_exact_match']:.0%} | {m['passkey_top1']:.0%} | "
                     f"{m['passkey_rank']:.2f} | {m['passkey_key_logprob']:.3f} |")
    lines += ["", (f"Short-context regression (phase 2 - base, at {cfg.short_len:,} tokens): "
                   f"{metrics['short_val_loss_delta']:+.4f} nats. Phase 2, last bucket - first bucket: "
                   f"{metrics['phase2_last_minus_first_bucket']:+.3f} nats.")]
    if any(math.isnan(r["loss"]) for r in positions):
        lines.append("\nSome buckets had no tokens (documents too short).")
    return "\n".join(lines)
