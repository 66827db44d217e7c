"""SFT stage (report §5.1): the model of role `model` fine-tuned with TRL's SFTTrainer on the distilled data of
role `data` (both forms), written as the standard model artifact (v3flow/training/posttrain.py says what happens
to the MTP module and the router biases).

    out_dir/run.json, trainer/, trained/, metrics.jsonl, tokenizer/    (v3flow/training/posttrain.py)
    out_dir/checkpoints/final/, hf/, model.json                        the model artifact
"""

from __future__ import annotations

from pathlib import Path

from stages.sft import trainer
from stages.sft.config import SftConfig
from v3flow.section import section_hash
from v3flow.stage import StageResult, StageSpec
from v3flow.training import posttrain

STAGE = "sft"
SPEC = StageSpec(
    STAGE, __name__, lambda cfg, wiring: cfg.posttrain.sft, settings={"posttrain.sft": SftConfig},
    inputs={"model": "extend_phase2", "data": "distill"}, libraries=posttrain.LIBRARIES,
    headline=("first_loss", "last_loss", "last_token_accuracy", "steps", "tokens_per_s"), model=True,
    phase="posttrain", curves=("loss",))


def run(cfg: SftConfig, out_dir: Path, inputs: dict[str, StageResult], resolve=Path) -> StageResult:
    data = inputs["data"]
    final, wall, result = posttrain.train(
        STAGE, trainer.__name__, inputs, out_dir, cfg, data.outputs["sft"], cfg.num_processes,
        data={"sft_data_key": data.key, "config_hash": section_hash(cfg)},
        extra={"trained_with": "trl.SFTTrainer"})
    steps = posttrain.read_metrics(out_dir)
    losses = [r["loss"] for r in steps if "loss" in r]
    metrics = {"train_loss": final["train_loss"], "first_loss": losses[0] if losses else float("nan"),
               "last_loss": losses[-1] if losses else float("nan"), "steps": final["steps"], "wall_time_s": wall,
               "tokens_per_epoch": final["tokens"], "tokens_per_s": final["tokens"] * cfg.epochs / wall,
               "samples": final["samples"], "packed_sequences": final["sequences"]}
    accuracy = [r["mean_token_accuracy"] for r in steps if "mean_token_accuracy" in r]
    if accuracy:
        metrics["last_token_accuracy"] = accuracy[-1]
    result.metrics, result.datasets = metrics, {"distilled-sft": data.outputs["sft"]}
    result.report_md = "\n".join([
        "## SFT (TRL SFTTrainer)", "", "| | |", "|---|---|",
        f"| samples / packed sequences of {cfg.max_length} | {final['samples']:,} / {final['sequences']:,} |",
        f"| epochs / steps | {cfg.epochs:g} / {final['steps']} |",
        f"| learning rate | cosine {cfg.lr:g} -> {cfg.min_lr:g} |",
        f"| loss first / last logged | {metrics['first_loss']:.4f} / {metrics['last_loss']:.4f} |",
        f"| wall time, tokens/s | {wall:,.0f} s, {metrics['tokens_per_s']:,.0f} |",
        "", posttrain.CARRIED_NOTE])
    return result
