"""What the TRL stages (SFT, GRPO) share: the trainer process's arguments, its metrics, resume, and the model
artifact it leaves.

Who trains what: TRL trains transformers' `DeepseekV3ForCausalLM` loaded from the input model's Hugging Face
export (role `model`), with BF16 autocast where BF16 is fast (`use_bf16`). That class has neither the MTP module nor
the bias-update rule; the stage's RouterAndMtp fields (posttrain_recipe.py) say what happens to them instead:
    router=bias_update  `RouterBalance` runs the report's auxiliary-loss-free rule during TRL training (gamma =
                        bias_speed after every optimizer step) and logs MaxVio; frozen: router weights and biases
                        stay as they were
    mtp=refit           after TRL training the MTP module alone is refit on packed pretraining sequences, trunk
                        frozen (mtp_refit.py); carry: the input model's MTP module, unchanged
Afterwards the trained weights (router biases included) are merged back into our model (`artifact_from_trained`),
which writes the same model artifact as every model stage: our safetensors checkpoint, the Hugging Face folder
exported from it (logits parity as for every export), and model.json saying all this.

    out_dir/run.json       what the trainer process runs (a TrlSpec, written by the stage)
    out_dir/tokenizer/     the input model's tokenizer files (chat template included)
    out_dir/trainer/       TRL's checkpoints (checkpoint-N/: model.safetensors, optimizer and RNG states loaded
                           with torch.load(weights_only=True) by transformers); a killed run resumes from the last
    out_dir/trained/       the final weights as TRL saved them
    out_dir/metrics.jsonl  every logged step (the curves), also in the stage's MLflow run
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from v3flow import training
from v3flow.errors import ConfigError
from v3flow.model.hf_format import export_hf, from_hf_state_dict
from v3flow.model.moe import bias_update, max_violation
from v3flow.model.transformer import Transformer
from v3flow.stage import StageResult, chain_lineage
from v3flow.training import artifact, launch, mtp_refit, precision
from v3flow.training.posttrain_recipe import InputRelativeLr, RouterAndMtp
from v3flow.training.spec import TrlSpec

TRAINER_DIR, TRAINED_DIR, TOKENIZER_DIR, METRICS = "trainer", "trained", "tokenizer", "metrics.jsonl"
LIBRARIES = (*training.LIBRARIES, "trl", "datasets", "tokenizers")
MAXVIO = "router/maxvio"  # the key RouterBalance adds to the logs


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


def fp32_head(model) -> None:
    """The LM head computed outside autocast, in FP32: the policy's log-probabilities (and so the ratio and the KL)
    stop being BF16-rounded (ScaleRL's FP32 head; TRL's cast_lm_head_to_fp32 does not escape autocast). The
    parameters stay where they are, so checkpoints keep their names."""
    head = model.get_output_embeddings()

    def forward(hidden):
        with torch.autocast(hidden.device.type, enabled=False):
            return torch.nn.functional.linear(hidden.float(), head.weight.float())

    head.forward = forward


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


def hf_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The routers of transformers' DeepseekV3ForCausalLM (weight, e_score_correction_bias), one per MoE layer."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    return [m for m in model.modules() if isinstance(m, DeepseekV3TopkRouter)]


class RouterBalance(TrainerCallback):
    """The auxiliary-loss-free balancing of report §2.1.2 while TRL trains transformers' DeepseekV3ForCausalLM, as our
    loop does it (MoE.update_bias). A forward hook on every router (`DeepseekV3TopkRouter`) counts the tokens each
    expert gets in the passes that train (module.training and grad enabled: GRPO's generation and its no-grad
    log-probability passes do not count). After every optimizer step each layer's `e_score_correction_bias` moves
    by b_i += gamma * sign(mean load - load_i), over all processes' loads, and the counts restart. Padding does not
    count where the batch has a [B, T] attention mask (GRPO: prompt padding and everything after EOS); packed SFT
    batches have none, and no padding. The step's MaxVio (mean over MoE layers) is added to the logs as MAXVIO,
    averaged since the last log: place this callback before MetricsLog, which writes them.

    mode "frozen": the router weights get requires_grad False here (construct this before the Trainer, which builds
    its optimizer from the parameters that require grad) and the biases stay; loads are still counted and logged.
    Like our MoE, it assumes no activation checkpointing (a replayed forward would count twice)."""

    def __init__(self, model: torch.nn.Module, mode: str, gamma: float):
        self.routers = hf_routers(model)
        self.gamma = gamma if mode == "bias_update" else 0.0
        for router in self.routers:
            router.weight.requires_grad_(mode != "frozen")
        self.loads = [torch.zeros(r.num_experts) for r in self.routers]  # tokens per expert, this step
        self.mask: torch.Tensor | None = None  # the attention mask of the forward pass under way
        self.maxvio: list[float] = []  # per step since the last log
        self.handles = [model.register_forward_pre_hook(self._batch, with_kwargs=True)]
        self.handles += [r.register_forward_hook(functools.partial(self._count, i)) for i, r in enumerate(self.routers)]

    def _batch(self, module, args, kwargs):
        self.mask = kwargs.get("attention_mask")

    def _count(self, i: int, router, inputs, output) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return
        indices = output[2]  # [B * T, K_r]
        if self.mask is not None and self.mask.dim() == 2 and self.mask.numel() == len(indices):
            indices = indices[self.mask.reshape(-1).bool()]
        counts = torch.bincount(indices.flatten(), minlength=router.num_experts).float()
        self.loads[i] = self.loads[i].to(counts.device) + counts

    def on_step_end(self, args, state, control, **kwargs):
        if not self.routers:
            return
        loads = torch.stack(self.loads)  # [MoE layers, N_r]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loads)  # every process applies the same update, from the global batch
        for router, layer in zip(self.routers, loads):
            bias_update(router.e_score_correction_bias, layer.to(router.e_score_correction_bias.device), self.gamma)
        if loads.sum() > 0:
            self.maxvio.append(sum(max_violation(layer) for layer in loads) / len(loads))
        self.loads = [torch.zeros_like(layer) for layer in self.loads]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.maxvio:
            logs[MAXVIO] = sum(self.maxvio) / len(self.maxvio)
            self.maxvio = []

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self.handles:
            handle.remove()


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


def merge_trained(source: Path, trained: Path) -> Transformer:
    """Our model with the weights TRL saved in `trained` (router biases included: `mlp.gate.e_score_correction_bias`
    -> `ffn.gate.bias`); the MTP module, which transformers' model lacks, from the input model `source`."""
    cfg = artifact.model_config(source)
    state = artifact.load_state(source)
    hf = {}
    for file in sorted(trained.glob("*.safetensors")):
        hf.update(load_file(str(file)))
    main = from_hf_state_dict(cfg.model_copy(update={"mtp_depth": 0}), hf)
    model = Transformer(cfg)
    model.load_state_dict({**state, **{k: v.to(state[k].dtype) for k, v in main.items()}})
    return model


def peak_lr(stage: str, settings: InputRelativeLr, source: Path) -> tuple[float, str]:
    """The stage's peak learning rate and where it comes from: `lr` when set, else `lr_scale` times the input
    model's pretraining peak (its model.json); a clear error where the input records none."""
    if settings.lr is not None:
        return settings.lr, f"posttrain.{stage}.lr"
    base = artifact.pretraining_peak_lr(source)
    if base is None:
        raise ConfigError(f"posttrain.{stage}.lr is unset, so it would be lr_scale x the pretraining peak learning "
                          f"rate of the input model, and {source} records none (no `pretraining_peak_lr` in its "
                          f"{artifact.MODEL_FILE}: a model from outside v3flow); set posttrain.{stage}.lr")
    return settings.lr_scale * base, f"{settings.lr_scale:g} x the input model's pretraining peak {base:g}"


def _refit_data(stage: str, settings: RouterAndMtp, mtp_data: Path | str | None) -> Path | None:
    if settings.mtp == "refit" and mtp_data is None:
        raise ConfigError(f"posttrain.{stage}.mtp=refit needs packed pretraining sequences, and the {stage} stage "
                          f"passed none (posttrain.train's mtp_data: a pack stage's packed/manifest.json); pass them, "
                          f"or set posttrain.{stage}.mtp=carry")
    return Path(mtp_data) if settings.mtp == "refit" else None


def describe(settings: RouterAndMtp, refit: dict[str, float] | None, has_mtp: bool) -> dict:
    """What model.json says happened to the router biases and the MTP module, in words and in numbers."""
    if settings.router == "bias_update":
        biases = (f"updated during TRL training by the auxiliary-loss-free rule (gamma = {settings.bias_speed:g} after "
                  "every optimizer step); the router weights trained")
    else:
        biases = "frozen: router weights and biases as in the input model"
    if not has_mtp:
        mtp = "none (the model has no MTP module)"
    elif refit is not None:
        mtp = (f"refit for {settings.mtp_refit_steps} steps on packed pretraining sequences with the trunk frozen "
               f"(held-out MTP loss {refit['held_loss_before']:.4f} -> {refit['held_loss_after']:.4f})")
    else:
        mtp = ("carried over unchanged from the input model (transformers' DeepseekV3ForCausalLM has no MTP module, so "
               "TRL does not train it)")
    router = {"mode": settings.router, "gamma": settings.bias_speed if settings.router == "bias_update" else 0.0}
    mtp_numbers = {"mode": settings.mtp if has_mtp else "none"}
    if refit is not None:
        mtp_numbers.update(steps=settings.mtp_refit_steps, lr=settings.mtp_refit_lr, batch=settings.mtp_refit_batch,
                           **refit)
    return {"router_biases": biases, "mtp": mtp, "router_update": router, "mtp_refit": mtp_numbers}


def artifact_from_trained(stage: str, source: Path, trained: Path, out_dir: Path, lineage: dict[str, str],
                          data: dict, extra: dict, settings: RouterAndMtp, seed: int,
                          mtp_data: Path | str | None = None) -> Path:
    """Our model with the trained weights and router biases (`merge_trained`), its MTP module refit on the packed
    sequences of `mtp_data` (a pack stage's manifest) when settings.mtp is refit, saved as our checkpoint and
    exported again in the Hugging Face format, with model.json: the standard model artifact."""
    packed = _refit_data(stage, settings, mtp_data)
    model = merge_trained(source, trained)
    masked = artifact.document_masked(source)  # post-training keeps how its input attends packed text
    refit = None
    if packed is not None and len(model.mtp):
        refit = mtp_refit.refit_from_packed(model, packed, settings, seed, log=f"[{stage}]", document_mask=masked)
    checkpoints = out_dir / "checkpoints" / "final"
    checkpoints.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoints / "model.safetensors"))
    hf_dir = export_hf(model, out_dir / "hf", tokenizer_dir=out_dir / TOKENIZER_DIR)
    notes = describe(settings, refit, has_mtp=len(model.mtp) > 0)
    artifact.write_manifest(out_dir, stage, model.cfg, lineage, data, checkpoint=checkpoints, hf=hf_dir,
                            extra={"init_from": str(source), "document_mask": masked,
                                   "pretraining_peak_lr": artifact.pretraining_peak_lr(source), **notes, **extra})
    return hf_dir


def train(stage: str, trainer_module: str, inputs: dict, out_dir: Path, recipe, files: str, num_processes: int,
          data: dict, extra: dict, *, settings: RouterAndMtp, seed: int, mtp_data: Path | str | None):
    """What every TRL stage does: write the spec (`recipe`, its data `files`), run the trainer process on the model
    of role `model`, write the standard model artifact. `settings`: the stage's router and MTP fields (its SftConfig
    or GrpoConfig); `seed`: the stage's, also the MTP refit's; `mtp_data`: the packed pretraining sequences the MTP
    refit reads (a pack stage's packed/manifest.json; may be None only with mtp=carry). Returns the trainer's
    final.json, its wall time and a StageResult to complete."""
    _refit_data(stage, settings, mtp_data)  # before hours of training, not after
    source = Path(inputs["model"].outputs["model"])
    prepare(stage, source, out_dir, recipe, files)
    started = time.time()
    launch.launch(trainer_module, out_dir, num_processes, "torchrun", prefix=f"[{stage}]")
    wall = time.time() - started
    artifact_from_trained(stage, source, out_dir / TRAINED_DIR, out_dir, chain_lineage(inputs, stage, out_dir.name),
                          data, extra, settings, seed, mtp_data)
    result = StageResult(
        stage=stage, key=out_dir.name, out_dir=str(out_dir),
        outputs={"model": str(out_dir), "hf": str(out_dir / "hf"), "metrics": str(out_dir / METRICS)},
        params={"input_model": str(source)},
        artifacts=[str(out_dir / METRICS), str(out_dir / artifact.MODEL_FILE), str(out_dir / "hf")])
    return json.loads((out_dir / "final.json").read_text()), wall, result


def carried_note(out_dir: Path) -> str:
    """One line for a stage's report: what its model.json says happened to the router biases and the MTP module."""
    manifest = artifact.read_manifest(out_dir)
    return f"Router biases: {manifest['router_biases']}. MTP: {manifest['mtp']}."


def refit_metrics(out_dir: Path) -> dict[str, float]:
    """The MTP refit's numbers from model.json, as stage metrics (`mtp_refit.*`)."""
    refit = artifact.read_manifest(out_dir).get("mtp_refit") or {}
    return {f"mtp_refit.{k}": float(v) for k, v in refit.items() if isinstance(v, int | float)}
