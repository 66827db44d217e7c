"""SFT stage (report §5.1): the model of role `model` fine-tuned with TRL's SFTTrainer on the distilled data of
role `data` (both forms) mixed with general data (role `general`: the pretraining corpus's packed sequences) at
`general_share` of the tokens, written as the standard model artifact (v3flow/training/posttrain.py says what
happens to the MTP module and the router biases).

Why the mixture: a small model fine-tuned on one narrow task at a learning rate that teaches it the task forgets
the rest (measured here: +5.7 nats of corpus loss after SFT on arithmetic alone; one corpus sequence per step
cut it to +0.17 at almost the same SFT loss). DeepSeek-V3 mixes non-reasoning data into SFT (§5.1).

    out_dir/sft_mix.parquet   the mixture, tokenized: input_ids, assistant_masks (1: the token carries loss), source
    out_dir/run.json, trainer/, trained/, metrics.jsonl, tokenizer/    (v3flow/training/posttrain.py)
    out_dir/checkpoints/final/, hf/, model.json                        the model artifact
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np

from stages.sft import trainer
from stages.sft.config import SftConfig
from v3flow.section import section_hash
from v3flow.stage import StageResult, StageSpec
from v3flow.training import posttrain

STAGE = "sft"
SPEC = StageSpec(
    STAGE, __name__, lambda cfg, wiring: cfg.posttrain.sft, settings={"posttrain.sft": SftConfig},
    inputs={"model": "extend_phase2", "data": "distill", "general": "pack"}, libraries=posttrain.LIBRARIES,
    headline=("first_loss", "last_loss", "last_token_accuracy", "steps", "tokens_per_s"), model=True,
    phase="posttrain", curves=("loss",))


def pieces(seq: np.ndarray, max_length: int, eos: int | None = None) -> list[np.ndarray]:
    """A packed corpus sequence cut into rows of at most `max_length` tokens; given `eos`, first cut after every
    EOS, so that each row holds one document (or a piece of one)."""
    docs = np.split(seq, np.flatnonzero(seq[:-1] == eos) + 1) if eos is not None else [seq]
    return [doc[start: start + max_length] for doc in docs for start in range(0, len(doc), max_length)]


def mixture(cfg: SftConfig, distilled: str, packed_manifest: str, hf_dir: Path, out: Path,
            documents: bool = False) -> dict[str, int]:
    """The distilled samples (the configured forms) rendered with the chat template, loss on the assistant turn;
    general rows (`max_length`-token pieces of seeded-random corpus sequences, loss on every token) until they
    hold `general_share` of the tokens; shuffled with the seed. Returns the counts.

    `documents`: the input model was pretrained attending within each packed document (pretrain.document_mask),
    so each general row is one document (cut at its EOS), masked from the others as every packed SFT sample is;
    otherwise a row spans documents, as that model's pretraining rows did."""
    import datasets
    from transformers import AutoTokenizer

    from v3flow.training.data import PackedSequences

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    rows = []
    for row in datasets.load_dataset("parquet", data_files=distilled, split="train"):
        if row["form"] in cfg.forms:
            enc = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            rows.append({"input_ids": enc["input_ids"][: cfg.max_length],
                         "assistant_masks": enc["assistant_masks"][: cfg.max_length], "source": "distilled"})
    distilled_tokens = sum(len(r["input_ids"]) for r in rows)
    wanted = math.ceil(distilled_tokens * cfg.general_share / (1 - cfg.general_share))
    general_tokens = 0
    if wanted:
        corpus = PackedSequences(Path(packed_manifest), "train")
        for index in corpus.order(0, cfg.seed):  # the seeded order, once through at most
            if general_tokens >= wanted:
                break
            seq = corpus.rows(index[None])[0].numpy()
            seq = seq[seq != corpus.pad_id]
            for piece in pieces(seq, cfg.max_length, corpus.eos_id if documents else None):
                piece = piece[: wanted - general_tokens].tolist()
                if len(piece) > 1:  # a row of one token has nothing to predict
                    rows.append({"input_ids": piece, "assistant_masks": [1] * len(piece), "source": "general"})
                    general_tokens += len(piece)
    random.Random(cfg.seed).shuffle(rows)
    datasets.Dataset.from_list(rows).to_parquet(str(out))
    return {"distilled_rows": sum(r["source"] == "distilled" for r in rows), "distilled_tokens": distilled_tokens,
            "general_rows": sum(r["source"] == "general" for r in rows), "general_tokens": general_tokens}


def run(cfg: SftConfig, out_dir: Path, inputs: dict[str, StageResult], resolve=Path) -> StageResult:
    from v3flow.training import artifact

    data, general = inputs["data"], inputs["general"]
    source = Path(inputs["model"].outputs["model"])
    lr, lr_from = posttrain.peak_lr(STAGE, cfg, source)
    out_dir.mkdir(parents=True, exist_ok=True)
    mix = out_dir / "sft_mix.parquet"
    counts = mixture(cfg, data.outputs["sft"], general.outputs["manifest"],
                     source / artifact.read_manifest(source)["hf"], mix, documents=artifact.document_masked(source))
    print(f"[{STAGE}] mixture: {counts['distilled_rows']:,} distilled samples ({counts['distilled_tokens']:,} tokens) + "
          f"{counts['general_rows']:,} general rows ({counts['general_tokens']:,} tokens)", flush=True)
    final, wall, result = posttrain.train(
        STAGE, trainer.__name__, inputs, out_dir, cfg.model_copy(update={"lr": lr}), str(mix), cfg.num_processes,
        data={"sft_data_key": data.key, "general_data_key": general.key, "config_hash": section_hash(cfg)},
        extra={"trained_with": "trl.SFTTrainer", "learning_rate": lr, "learning_rate_from": lr_from}, settings=cfg,
        seed=cfg.seed, mtp_data=general.outputs["manifest"])
    steps = posttrain.read_metrics(out_dir)
    losses = [r["loss"] for r in steps if "loss" in r]
    metrics = {"train_loss": final["train_loss"], "first_loss": losses[0] if losses else float("nan"),
               "last_loss": losses[-1] if losses else float("nan"), "steps": final["steps"], "wall_time_s": wall,
               "tokens_per_epoch": final["tokens"], "tokens_per_s": final["tokens"] * cfg.epochs / wall,
               "samples": final["samples"], "packed_sequences": final["sequences"], "peak_lr": lr, **counts,
               "general_token_share": counts["general_tokens"] / max(counts["general_tokens"] +
                                                                     counts["distilled_tokens"], 1)}
    accuracy = [r["mean_token_accuracy"] for r in steps if "mean_token_accuracy" in r]
    if accuracy:
        metrics["last_token_accuracy"] = accuracy[-1]
    metrics.update(posttrain.refit_metrics(out_dir))
    result.metrics, result.datasets = metrics, {"distilled-sft": data.outputs["sft"], "sft-mixture": str(mix)}
    result.report_md = "\n".join([
        "## SFT (TRL SFTTrainer)", "", "| | |", "|---|---|",
        f"| samples / packed sequences of {cfg.max_length} | {final['samples']:,} / {final['sequences']:,} |",
        (f"| distilled / general tokens | {counts['distilled_tokens']:,} / {counts['general_tokens']:,} "
         f"({metrics['general_token_share']:.0%} general) |"),
        f"| epochs / steps | {cfg.epochs:g} / {final['steps']} |",
        f"| learning rate | cosine {lr:g} -> {lr * cfg.min_lr_ratio:g} (peak: {lr_from}) |",
        f"| loss first / last logged | {metrics['first_loss']:.4f} / {metrics['last_loss']:.4f} |",
        f"| wall time, tokens/s | {wall:,.0f} s, {metrics['tokens_per_s']:,.0f} |",
        "", posttrain.carried_note(out_dir)])
    return result
