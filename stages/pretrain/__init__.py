"""Pretraining stage: packed data in, a trained DeepSeek-V3 checkpoint (ours and Hugging Face format) out.

The training loop (trainer.py) runs in its own process group: one process by default, several through
torchrun (DDP; gloo on CPU, NCCL on GPU) or `accelerate launch` with an accelerate config (FSDP2,
multi-node). Running it as a child process means a cancelled or crashed flow run can kill every worker
(os.killpg), and a killed run restarts from its last checkpoint when the stage runs again.

    out_dir/run.json        what the trainer runs (model, recipe, data manifest, lineage)
    out_dir/checkpoints/    full safetensors checkpoints (exact resume)
    out_dir/metrics.jsonl   every step's numbers; events.log: guard events
    out_dir/hf/             the final model in the Hugging Face DeepSeek-V3 format, with the tokenizer
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

from v3flow.errors import V3flowError
from v3flow.section import section_hash
from v3flow.stage import StageResult
from v3flow.stages.pretrain.config import PretrainStageConfig

STAGE = "pretrain"


class TrainingError(V3flowError):
    """The training process failed; the message carries the tail of its output."""


def _command(cfg: PretrainStageConfig, run_dir: Path, resolve=Path) -> list[str]:
    p = cfg.pretrain
    module = ["-m", "v3flow.stages.pretrain.trainer", str(run_dir)]
    if p.num_processes == 1:
        return [sys.executable, *module]
    if p.launcher == "accelerate":  # (not --cpu: it collapses the processes into one; the trainer picks gloo)
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(p.num_processes),
                "--config_file", str(resolve(p.accelerate_config)), *module]
    # --standalone: torchrun binds its own free loopback rendezvous port (no pick-then-bind race)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={p.num_processes}",
            *module]


def check_launcher(cfg: PretrainStageConfig, resolve=Path) -> None:
    """accelerate runs FSDP only on accelerators: on a CPU machine it would quietly fall back to plain data
    parallelism, so refuse an FSDP accelerate config there instead of training something else."""
    import torch
    import yaml

    p = cfg.pretrain
    if p.launcher != "accelerate" or torch.cuda.is_available():
        return
    path = resolve(p.accelerate_config)
    if yaml.safe_load(path.read_text()).get("distributed_type") == "FSDP":
        raise TrainingError(f"pretrain.accelerate_config={p.accelerate_config}: distributed_type FSDP needs GPUs "
                            "(accelerate shards only on accelerators); on CPU use configs/accelerate/ddp.yaml or "
                            "launcher: torchrun")


def launch(cfg: PretrainStageConfig, run_dir: Path, env: dict | None = None, resolve=Path) -> None:
    """Run the trainer to completion, streaming its output; kill its whole process group on interruption."""
    check_launcher(cfg, resolve)
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    if cfg.pretrain.num_processes > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.pretrain.num_processes)))
    proc = subprocess.Popen(_command(cfg, run_dir, resolve), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    tail: deque[str] = deque(maxlen=40)
    try:
        for line in proc.stdout:
            tail.append(line.rstrip())
            if line.startswith("[pretrain]"):
                print(line.rstrip(), flush=True)
        code = proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # a cancelled flow run must not leave workers behind
        proc.wait()
        raise
    if code != 0:
        raise TrainingError(f"training exited with status {code}; last output:\n" + "\n".join(tail))


def run(cfg: PretrainStageConfig, out_dir: Path, inputs: dict[str, StageResult], resolve=Path) -> StageResult:
    data = inputs["data"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lineage = {"data_key": data.key, "manifest_sha256": data.params.get("manifest_sha256", ""),
               "tokenizer_sha256": data.params.get("tokenizer_sha256", ""), "config_hash": section_hash(cfg)}
    spec = {"model": cfg.model.model_dump(mode="json"), "pretrain": cfg.pretrain.model_dump(mode="json"),
            "manifest": data.outputs["manifest"], "tokenizer": data.outputs["tokenizer"], "lineage": lineage}
    (out_dir / "run.json").write_text(json.dumps(spec, indent=2))
    launch(cfg, out_dir, resolve=resolve)
    final = json.loads((out_dir / "final.json").read_text())
    unigram = json.loads(Path(data.outputs["manifest"]).read_text())["train_unigram_entropy_nats"]
    metrics = {f"final_{k}": float(v) for k, v in final.items() if isinstance(v, int | float)}
    metrics["unigram_entropy_nats"] = unigram
    hf = out_dir / "hf"
    result = StageResult(
        stage=STAGE, key=out_dir.name, out_dir=str(out_dir),
        outputs={"checkpoints": str(out_dir / "checkpoints"), "hf": str(hf),
                 "metrics": str(out_dir / "metrics.jsonl")},
        metrics=metrics, params={f"lineage.{k}": v for k, v in lineage.items()},
        artifacts=[str(out_dir / "metrics.jsonl"), str(out_dir / "run.json")] + ([str(hf)] if hf.is_dir() else []),
    )
    result.report_md = "\n".join([
        "## Pretraining", "", "| | |", "|---|---|",
        f"| steps / tokens | {final['steps']:,} / {final['tokens']:,} |",
        f"| final validation loss | {final['val_loss']:.4f} nats (perplexity {final['val_perplexity']:.1f}) |",
        f"| unigram entropy of the data | {unigram:.4f} nats |",
        f"| mean expert MaxVio (last step) | {final.get('maxvio_mean', float('nan')):.3f} |",
        f"| skipped updates / rollbacks | {final['skipped_steps']} / {final['rollbacks']} |",
        (f"| MTP draft acceptance (self-speculative decoding) | {final.get('mtp_acceptance_rate', float('nan')):.1%}"
         f" ± {final.get('mtp_acceptance_stderr', float('nan')):.1%} ({final.get('mtp_drafted_tokens', 0)} drafts, "
         f"{final.get('mtp_prompts', 0)} prompts), {final.get('mtp_tokens_per_pass', float('nan')):.2f} tokens per "
         "main pass |"),
        "", f"Hugging Face export: `{hf}`",
    ])
    return result
