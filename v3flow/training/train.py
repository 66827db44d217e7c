"""What every stage that trains on our loop does (pretraining, both context-extension phases): write the trainer's
spec, run the loop under the recipe's launcher, and leave the standard model artifact (v3flow/training/artifact.py:
our checkpoint, the Hugging Face folder, model.json with its lineage) with the stage's result and report.

    out_dir/run.json        the LoopSpec the trainer runs (model, recipe, data manifest, lineage)
    out_dir/checkpoints/    full safetensors checkpoints (exact resume)
    out_dir/metrics.jsonl   every step's numbers; events.log: guard events
    out_dir/hf/             the final model in the Hugging Face DeepSeek-V3 format, with the tokenizer
    out_dir/model.json      the model artifact's manifest

The loop runs in its own process group (v3flow/training/launch.py): one process by default, several through
torchrun or `accelerate launch`; a killed run restarts from its last checkpoint when the stage runs again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from v3flow.model.args import ModelConfig
from v3flow.stage import StageResult, chain_lineage
from v3flow.training import artifact, checkpoint, launch
from v3flow.training.launch import TrainingError
from v3flow.training.recipe import Recipe
from v3flow.training.spec import LoopSpec

__all__ = ["CURVES", "HEADLINE", "TrainingError", "run_loop", "train"]

HEADLINE = ("final_val_loss", "final_val_perplexity", "final_mtp_acceptance_rate", "final_maxvio_mean",
            "tokens_per_s", "wall_time_s")
CURVES = ("loss", "val_loss")


def run_loop(recipe: Recipe, run_dir: Path, env: dict | None = None, resolve=Path, stage: str = "pretrain") -> None:
    """Run the loop on run_dir/run.json under the recipe's launcher, to completion."""
    from v3flow.training import loop  # named here, imported in the trainer process (torch stays out of the flow)

    launch.launch(loop.__name__, run_dir, recipe.num_processes, recipe.launcher,
                  resolve(recipe.accelerate_config) if recipe.accelerate_config else None, env, prefix=f"[{stage}]",
                  config_key="pretrain.accelerate_config")


def train(stage: str, model: ModelConfig, recipe: Recipe, config_hash: str, out_dir: Path,
          inputs: dict[str, StageResult], init_from: str | None, resolve=Path,
          extra: dict | None = None) -> StageResult:
    """Train `model` with `recipe` on the packed data of role `data` (from `init_from` when set); returns the
    stage's result with its metrics and report table."""
    data = inputs["data"]
    out_dir.mkdir(parents=True, exist_ok=True)
    chain = chain_lineage(inputs, stage, out_dir.name)
    data_ids = {"manifest_sha256": data.params.get("manifest_sha256", ""),
                "tokenizer_sha256": data.params.get("tokenizer_sha256", "")}
    lineage = {"data_key": data.key, **data_ids, "config_hash": config_hash}
    LoopSpec(stage=stage, model=model, recipe=recipe, manifest=data.outputs["manifest"],
             tokenizer=data.outputs["tokenizer"], lineage=lineage, init_from=init_from).write(out_dir)
    started = time.time()
    run_loop(recipe, out_dir, resolve=resolve, stage=stage)
    wall = time.time() - started
    final = json.loads((out_dir / "final.json").read_text())
    manifest = json.loads(Path(data.outputs["manifest"]).read_text())
    unigram = manifest["train_unigram_entropy_nats"]
    steps = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in steps if "tokens_per_s" in r]
    metrics = {f"final_{k}": float(v) for k, v in final.items() if isinstance(v, int | float)}
    metrics.update(unigram_entropy_nats=unigram, wall_time_s=wall, seq_len=manifest["seq_len"],
                   tokens_per_s=sum(rates) / len(rates) if rates else final["tokens"] / wall,  # short runs log none
                   peak_memory_gb=max((r.get("peak_memory_gb", 0.0) for r in steps), default=0.0))
    run_params = json.loads((out_dir / "run_params.json").read_text())  # choices made at run time (precision)
    hf = out_dir / "hf"
    artifact.write_manifest(out_dir, stage, model, chain, {**data_ids, "seq_len": manifest["seq_len"]},
                            checkpoint=training_checkpoint(out_dir), hf=hf if hf.is_dir() else None,
                            extra={"init_from": init_from, "document_mask": recipe.document_mask,
                                   "pretraining_peak_lr": artifact.pretraining_peak_lr(Path(init_from)) if init_from
                                   else recipe.schedule.peak_lr, **(extra or {})})
    result = StageResult(
        stage=stage, key=out_dir.name, out_dir=str(out_dir),
        outputs={"model": str(out_dir), "checkpoints": str(out_dir / "checkpoints"), "hf": str(hf),
                 "metrics": str(out_dir / "metrics.jsonl")},
        metrics=metrics, params={**{f"lineage.{k}": v for k, v in lineage.items()}, **run_params},
        artifacts=[str(out_dir / "metrics.jsonl"), str(out_dir / "run.json"), str(out_dir / artifact.MODEL_FILE)]
        + ([str(hf)] if hf.is_dir() else []),
    )
    result.report_md = _report(final, manifest["seq_len"], unigram, wall, metrics, run_params, hf)
    return result


def _report(final: dict, seq_len: int, unigram: float, wall: float, metrics: dict, run_params: dict, hf: Path) -> str:
    return "\n".join([
        "| | |", "|---|---|",
        f"| steps / tokens | {final['steps']:,} / {final['tokens']:,} of {seq_len:,}-token sequences |",
        f"| final validation loss | {final['val_loss']:.4f} nats (perplexity {final['val_perplexity']:.1f}) |",
        f"| unigram entropy of the data | {unigram:.4f} nats |",
        f"| mean expert MaxVio (last step) | {final.get('maxvio_mean', float('nan')):.3f} |",
        (f"| wall time, mean tokens/s, peak memory | {wall:,.0f} s, {metrics['tokens_per_s']:,.0f}, "
         f"{metrics['peak_memory_gb']:.2f} GB |"),
        (f"| precision | {run_params['precision.gemms']} GEMMs, {run_params['precision.autocast']} elsewhere "
         f"({run_params['precision.reason']}) |"),
        f"| skipped updates / rollbacks | {final['skipped_steps']} / {final['rollbacks']} |",
        (f"| MTP draft acceptance (self-speculative decoding) | {final.get('mtp_acceptance_rate', float('nan')):.1%}"
         f" ± {final.get('mtp_acceptance_stderr', float('nan')):.1%} ({final.get('mtp_drafted_tokens', 0)} drafts, "
         f"{final.get('mtp_prompts', 0)} prompts), {final.get('mtp_tokens_per_pass', float('nan')):.2f} tokens per "
         "main pass |"),
        "", f"Hugging Face export: `{hf}`",
    ])


def training_checkpoint(out_dir: Path) -> Path:
    found = checkpoint.latest(out_dir / "checkpoints")
    if found is None:
        raise TrainingError(f"{out_dir}: training finished without a checkpoint")
    return found
