"""Pretraining stage: packed data in (role `data`), a trained DeepSeek-V3 out as the standard model artifact
(v3flow/training/artifact.py: our checkpoint, the Hugging Face folder, model.json with its lineage).

The training loop (trainer.py) runs in its own process group through the shared launcher
(v3flow/training/launch.py): one process by default, several through torchrun or `accelerate launch`; a
killed run restarts from its last checkpoint when the stage runs again.

    out_dir/run.json        what the trainer runs (model, recipe, data manifest, lineage)
    out_dir/checkpoints/    full safetensors checkpoints (exact resume)
    out_dir/metrics.jsonl   every step's numbers; events.log: guard events
    out_dir/hf/             the final model in the Hugging Face DeepSeek-V3 format, with the tokenizer
    out_dir/model.json      the model artifact's manifest

`pretrain.init_from` starts from an existing model (ours or a Hugging Face folder) instead of random weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from v3flow.cache import files_fingerprint
from v3flow.model.args import ModelConfig
from v3flow.section import section_hash
from v3flow.stage import StageResult, chain_lineage
from stages.pretrain.config import PretrainConfig, PretrainStageConfig
from v3flow.training import artifact, checkpoint
from v3flow.training import launch as training
from v3flow.training.launch import TrainingError

__all__ = ["STAGE", "TrainingError", "launch", "run", "train"]

STAGE = "pretrain"


def launch(p: PretrainConfig, run_dir: Path, env: dict | None = None, resolve=Path, stage: str = STAGE) -> None:
    """Run the trainer (trainer.py) on run_dir/run.json under the configured launcher; every training stage
    (pretraining, context extension) trains through here."""
    from stages.pretrain import trainer  # imported, not named, so the trainer's code is in callers' keys

    training.launch(trainer.__name__, run_dir, p.num_processes, p.launcher,
                    resolve(p.accelerate_config) if p.accelerate_config else None, env, prefix=f"[{stage}]",
                    config_key="pretrain.accelerate_config")


def fingerprint(cfg: PretrainStageConfig, resolve) -> str:
    """The files of `pretrain.init_from`, when set: part of the stage's key (another model, another run)."""
    if not cfg.pretrain.init_from:
        return ""
    return files_fingerprint(resolve(cfg.pretrain.init_from))


def run(cfg: PretrainStageConfig, out_dir: Path, inputs: dict[str, StageResult], resolve=Path) -> StageResult:
    init_from = str(resolve(cfg.pretrain.init_from)) if cfg.pretrain.init_from else None
    if init_from:
        artifact.check_compatible(Path(init_from), cfg.model, "pretrain.init_from")
    result = train(STAGE, cfg.model, cfg.pretrain, section_hash(cfg), Path(out_dir), inputs, init_from, resolve)
    result.report_md = f"## Pretraining\n\n{result.report_md}"
    return result


def train(stage: str, model: ModelConfig, recipe: PretrainConfig, config_hash: str, out_dir: Path,
          inputs: dict[str, StageResult], init_from: str | None, resolve=Path, extra: dict | None = None) -> StageResult:
    """What every training stage does: write run.json, run the trainer on the packed data of role `data` (from
    `init_from` when set), write the model artifact and the stage result with its report."""
    data = inputs["data"]
    out_dir.mkdir(parents=True, exist_ok=True)
    chain = chain_lineage(inputs, stage, out_dir.name)
    data_ids = {"manifest_sha256": data.params.get("manifest_sha256", ""),
                "tokenizer_sha256": data.params.get("tokenizer_sha256", "")}
    lineage = {"data_key": data.key, **data_ids, "config_hash": config_hash}
    spec = {"stage": stage, "model": model.model_dump(mode="json"), "pretrain": recipe.model_dump(mode="json"),
            "manifest": data.outputs["manifest"], "tokenizer": data.outputs["tokenizer"], "lineage": lineage,
            "init_from": init_from}
    (out_dir / "run.json").write_text(json.dumps(spec, indent=2))
    started = time.time()
    launch(recipe, out_dir, resolve=resolve, stage=stage)
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
                            extra={"init_from": init_from, **(extra or {})})
    result = StageResult(
        stage=stage, key=out_dir.name, out_dir=str(out_dir),
        outputs={"model": str(out_dir), "checkpoints": str(out_dir / "checkpoints"), "hf": str(hf),
                 "metrics": str(out_dir / "metrics.jsonl")},
        metrics=metrics, params={**{f"lineage.{k}": v for k, v in lineage.items()}, **run_params},
        artifacts=[str(out_dir / "metrics.jsonl"), str(out_dir / "run.json"), str(out_dir / artifact.MODEL_FILE)]
        + ([str(hf)] if hf.is_dir() else []),
    )
    result.report_md = "\n".join([
        "| | |", "|---|---|",
        f"| steps / tokens | {final['steps']:,} / {final['tokens']:,} of {manifest['seq_len']:,}-token sequences |",
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
    return result


def training_checkpoint(out_dir: Path) -> Path:
    found = checkpoint.latest(out_dir / "checkpoints")
    if found is None:
        raise TrainingError(f"{out_dir}: training finished without a checkpoint")
    return found
