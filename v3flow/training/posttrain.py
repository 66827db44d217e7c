"""What the TRL stages (SFT, GRPO) share: the trainer process's arguments, its metrics, resume, and the model
artifact it leaves.

Who trains what: TRL trains transformers' `DeepseekV3ForCausalLM` loaded from the input model's Hugging Face
export (role `model`), with BF16 autocast where BF16 is fast (`use_bf16`). That class has neither the MTP module nor
the bias-update rule, so post-training leaves both as they were: the MTP module is carried over unchanged from
the input model and the router biases stay frozen (gamma = 0). Afterwards the trained weights are merged back
into our model (`artifact_from_trained`), which writes the same model artifact as every model stage: our
safetensors checkpoint, the Hugging Face folder exported from it (logits parity as for every export), and
model.json saying all this.

    out_dir/run.json       what the trainer process runs (a TrlSpec, written by the stage)
    out_dir/tokenizer/     the input model's tokenizer files (chat template included)
    out_dir/trainer/       TRL's checkpoints (checkpoint-N/: model.safetensors, optimizer and RNG states loaded
                           with torch.load(weights_only=True) by transformers); a killed run resumes from the last
    out_dir/trained/       the final weights as TRL saved them
    out_dir/metrics.jsonl  every logged step (the curves), also in the stage's MLflow run
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from v3flow import training
from v3flow.model.hf_format import export_hf, from_hf_state_dict
from v3flow.model.transformer import Transformer
from v3flow.stage import StageResult, chain_lineage
from v3flow.training import artifact, launch, precision
from v3flow.training.spec import TrlSpec

TRAINER_DIR, TRAINED_DIR, TOKENIZER_DIR, METRICS = "trainer", "trained", "tokenizer", "metrics.jsonl"
LIBRARIES = (*training.LIBRARIES, "trl", "datasets", "tokenizers")
CARRIED = {"mtp": "carried over unchanged from the input model (transformers' DeepseekV3ForCausalLM has no MTP "
                  "module, so TRL does not train it)",
           "router_biases": "carried over unchanged (frozen: gamma = 0; TRL does not apply the bias update)"}


def use_bf16() -> bool:
    """BF16 autocast where it is fast: GPUs that have it, CPUs whose BF16 matmuls beat FP32 (a probe; AVX2-only
    CPUs run BF16 far slower). Master weights stay FP32 either way."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return precision.bf16_is_fast(torch.device("cpu"))


def trainer_args(out_dir: Path, spec: TrlSpec, seed: int, save_steps: int, logging_steps: int) -> dict:
    """TrainingArguments every TRL stage shares: the precision chosen in run.json, our checkpoints and logging."""
    cuda = torch.cuda.is_available()
    return {"output_dir": str(out_dir / TRAINER_DIR), "use_cpu": not cuda, "bf16": spec.bf16,
                "gradient_checkpointing": False, "report_to": [], "save_strategy": "steps", "save_steps": save_steps,
                "save_total_limit": 2, "logging_steps": logging_steps, "seed": seed, "data_seed": seed, "disable_tqdm": True,
                "dataloader_num_workers": 0}


def load_policy(hf_dir: str | Path, packed: bool = False, resume: str | None = None):
    """transformers' DeepseekV3ForCausalLM from a Hugging Face folder, FP32 master weights.

    `packed`: samples share sequences, told apart by their position ids; transformers masks them from each other
    only when no KV cache is built, so the cache is switched off (training never reads it).
    `resume`: a Trainer checkpoint whose weights replace the folder's. The Trainer's own resume cannot do this for
    an MoE: the checkpoint stores experts one by one (save_pretrained undoes the fused layout), the module holds
    them fused, and its non-strict load_state_dict silently keeps the old experts. from_pretrained converts."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)  # its path names the reference model
    if resume:
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(resume, dtype=torch.float32).state_dict())
    if packed:
        model.config.use_cache = False
    return model


def last_checkpoint(out_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = out_dir / TRAINER_DIR
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


class MetricsLog(TrainerCallback):
    """Each log line of the trainer into metrics.jsonl and the stage's MLflow run (MLFLOW_RUN_ID), as our own
    trainer does; transformers' MLflowCallback stays off (it would log TrainingArguments as params into the
    stage's run, where they clash with ours, and end the run). Prints a progress line per log."""

    def __init__(self, out_dir: Path, stage: str, watch: tuple[str, ...] = ()):
        self.path, self.stage, self.watch = out_dir / METRICS, stage, watch
        self.uri, self.run_id = os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_RUN_ID") or None
        self.started = time.time()
        self.logged = {r["step"] for r in read_metrics(out_dir)}  # a resumed run logs its checkpoint step again

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        numbers = {k: float(v) for k, v in logs.items() if isinstance(v, int | float) and math.isfinite(v)}
        record = {"step": state.global_step, "elapsed_s": round(time.time() - self.started, 1), **numbers}
        if state.global_step in self.logged:
            return
        self.logged.add(state.global_step)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        shown = "  ".join(f"{k} {numbers[k]:.4g}" for k in self.watch if k in numbers)
        print(f"[{self.stage}] step {state.global_step}/{state.max_steps}  {shown}", flush=True)
        if self.run_id:
            from v3flow import tracking  # only when logging: the trainer process needs no MLflow otherwise

            tracking.log_metrics(self.uri, self.run_id, numbers, step=state.global_step)


def read_metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def prepare(stage: str, source: Path, out_dir: Path, recipe, data: str) -> TrlSpec:
    """Write run.json (the trainer's spec: the recipe, its data, the architecture, which our checkpoint loader
    reads there, and the precision, chosen once: a resumed run keeps the choice of the run it continues, whatever
    a speed probe says now) and the input model's tokenizer; returns the spec."""
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    hf_in = source / artifact.read_manifest(source)["hf"]
    AutoTokenizer.from_pretrained(hf_in).save_pretrained(out_dir / TOKENIZER_DIR)
    before = out_dir / "run.json"
    bf16 = json.loads(before.read_text())["bf16"] if before.is_file() and last_checkpoint(out_dir) else use_bf16()
    spec = TrlSpec(stage=stage, model=artifact.model_config(source), hf_in=str(hf_in), bf16=bf16, recipe=recipe,
                   data=data)
    spec.write(out_dir)
    return spec


def artifact_from_trained(stage: str, source: Path, trained: Path, out_dir: Path, lineage: dict[str, str],
                          data: dict, extra: dict) -> Path:
    """Our model with the trained weights (MTP module and router biases from `source`), saved as our checkpoint
    and exported again in the Hugging Face format, with model.json: the standard model artifact."""
    cfg = artifact.model_config(source)
    state = artifact.load_state(source)
    hf = {}
    for file in sorted(trained.glob("*.safetensors")):
        hf.update(load_file(str(file)))
    main = from_hf_state_dict(cfg.model_copy(update={"mtp_depth": 0}), hf)
    main = {k: v.to(state[k].dtype) for k, v in main.items() if not k.endswith("ffn.gate.bias")}  # biases: frozen
    model = Transformer(cfg)
    model.load_state_dict({**state, **main})
    checkpoints = out_dir / "checkpoints" / "final"
    checkpoints.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoints / "model.safetensors"))
    hf_dir = export_hf(model, out_dir / "hf", tokenizer_dir=out_dir / TOKENIZER_DIR)
    artifact.write_manifest(out_dir, stage, cfg, lineage, data, checkpoint=checkpoints, hf=hf_dir,
                            extra={"init_from": str(source), **CARRIED, **extra})
    return hf_dir


def train(stage: str, trainer_module: str, inputs: dict, out_dir: Path, recipe, files: str, num_processes: int,
          data: dict, extra: dict):
    """What every TRL stage does: write the spec (`recipe`, its data `files`), run the trainer process on the model
    of role `model`, write the standard model artifact. Returns the trainer's final.json, its wall time and a
    StageResult to complete."""
    source = Path(inputs["model"].outputs["model"])
    prepare(stage, source, out_dir, recipe, files)
    started = time.time()
    launch.launch(trainer_module, out_dir, num_processes, "torchrun", prefix=f"[{stage}]")
    wall = time.time() - started
    artifact_from_trained(stage, source, out_dir / TRAINED_DIR, out_dir, chain_lineage(inputs, stage, out_dir.name),
                          data, extra)
    result = StageResult(
        stage=stage, key=out_dir.name, out_dir=str(out_dir),
        outputs={"model": str(out_dir), "hf": str(out_dir / "hf"), "metrics": str(out_dir / METRICS)},
        params={"input_model": str(source)},
        artifacts=[str(out_dir / METRICS), str(out_dir / artifact.MODEL_FILE), str(out_dir / "hf")])
    return json.loads((out_dir / "final.json").read_text()), wall, result


CARRIED_NOTE = f"MTP: {CARRIED['mtp']}. Router biases: {CARRIED['router_biases']}."
