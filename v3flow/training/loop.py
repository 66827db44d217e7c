"""Our training loop, on accelerate: pretraining and both context-extension phases train here. One process on
CPU by default; several with torchrun / accelerate launch.

    python -m v3flow.training.loop RUN_DIR        (RUN_DIR/run.json, a LoopSpec, is written by the stage)

Each step: the schedule gives the global batch (sequences), learning rate, lambda, gamma and alpha; every
process takes its slice of the global batch and accumulates micro-batches; the losses are averaged
across processes; the guard may skip the update; otherwise gradients are clipped, AdamW steps, and the
router biases move by gamma against the expert loads counted over the global batch (all-reduced).
Checkpoints (safetensors) hold everything needed to continue bit-for-bit; a restarted run resumes from
the latest one. Rank 0 writes metrics.jsonl, logs to the stage's MLflow run (MLFLOW_RUN_ID) and, at the
end, exports the model in the Hugging Face format.

Callbacks see each step without changing the loop: `on_step_begin(trainer)` and `on_loss(trainer, loss) -> loss`.
They are named in V3FLOW_TRAINER_CALLBACKS, a JSON list of {"target": "module:Class", **kwargs}; the tests'
fault injection (a SIGKILL, a NaN loss) is installed this way.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list

from v3flow.evaluation.language_model import mtp_acceptance
from v3flow.model.attention import set_attention_kernel
from v3flow.model.transformer import IGNORE, Transformer, checkpoint_activations
from v3flow.training import artifact, checkpoint, precision
from v3flow.training.data import PackedSequences
from v3flow.training.monitor import Monitor
from v3flow.training.optim import AdamW
from v3flow.training.recipe import Recipe
from v3flow.training.spec import LoopSpec

CALLBACKS_ENV = "V3FLOW_TRAINER_CALLBACKS"
PRECISION = "precision.json"  # the run's precision, as first chosen


class Callback:
    """Sees the loop's steps; both hooks are optional."""

    def on_step_begin(self, trainer: Trainer) -> None:
        """Before step `trainer.state["step"]` runs."""

    def on_loss(self, trainer: Trainer, loss: float) -> float:
        """The step's loss (averaged over processes) before the guard judges it; returns the loss to judge."""
        return loss


def load_callbacks(text: str | None) -> list:
    """The callbacks named in `text` (V3FLOW_TRAINER_CALLBACKS): [{"target": "module:Class", **kwargs}, ...]."""
    callbacks = []
    for entry in json.loads(text) if text else []:
        module, name = entry.pop("target").split(":")
        callbacks.append(getattr(importlib.import_module(module), name)(**entry))
    return callbacks


def build_optimizer(model: torch.nn.Module, cfg: Recipe, lr: float) -> AdamW:
    """AdamW (report: beta 0.9/0.95, weight decay 0.1, BF16 moments); no decay on norms (1-D weights)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                 moment_dtype=getattr(torch, cfg.moment_dtype))


class Trainer:
    def __init__(self, run_dir: Path, callbacks: list | None = None):
        spec = LoopSpec.read(run_dir)
        self.run_dir, self.spec, self.callbacks = run_dir, spec, callbacks or []
        self.tag = f"[{spec.stage}]"  # the stage this trainer runs for, in its log lines
        self.cfg, self.model_cfg = spec.recipe, spec.model
        self.acc = Accelerator(cpu=not torch.cuda.is_available(),
                               kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        if self.acc.num_processes != self.cfg.num_processes:
            raise RuntimeError(f"pretrain.num_processes={self.cfg.num_processes} but the launcher started "
                               f"{self.acc.num_processes} ({self.acc.distributed_type})")
        torch.manual_seed(self.cfg.seed)
        model = Transformer(self.model_cfg)
        model.init_weights()
        if spec.init_from:  # weights and router biases; a checkpoint of this run, if any, wins below
            model.load_state_dict(artifact.load_state(Path(spec.init_from)))
            self.acc.print(f"{self.tag} initialised from {spec.init_from}")
        found = checkpoint.latest(run_dir / "checkpoints")
        self.precision = self._precision(run_dir, resuming=found is not None)
        self.raw = precision.apply(model, self.precision)
        set_attention_kernel(model, self.cfg.attention)
        checkpoint_activations(model, self.cfg.activation_checkpointing)
        self.opt = build_optimizer(model, self.cfg, self.cfg.schedule.lr(0, 0))
        self.model, self.opt = self.acc.prepare(model, self.opt)
        self.train = PackedSequences(Path(spec.manifest), "train")
        self.val = PackedSequences(Path(spec.manifest), "val")
        self.state = {"step": 0, "tokens": 0, "position": 0, "ema": None, "ema_steps": 0, "skips": 0,
                      "skipped_total": 0, "rollbacks": 0, "lineage": spec.lineage}
        self.monitor = Monitor(run_dir, self.raw, self.acc.is_main_process, self.train.seq_len, self.acc.device,
                               self.tag)
        self.monitor.params(self.precision.as_params())
        self.acc.print(f"{self.tag} precision: {self.precision.gemms} GEMMs, {self.precision.autocast} elsewhere "
                       f"({self.precision.reason})")
        if found:
            self.state = checkpoint.load(found, self.raw, self.opt.optimizer)
            self.acc.print(f"{self.tag} resumed from {found.name} at step {self.state['step']}")

    def _precision(self, run_dir: Path, resuming: bool) -> precision.Precision:
        """Chosen once a run, by rank 0, for every rank: a restarted run keeps its first choice, since `auto`
        times a matmul of each dtype and may decide otherwise where BF16 and FP32 run about as fast."""
        path = run_dir / PRECISION
        if resuming and path.is_file():
            return precision.Precision(**json.loads(path.read_text()))
        chosen = [precision.choose(self.cfg.precision, self.cfg.high_precision, self.acc.device)
                  if self.acc.is_main_process else None]
        chosen = broadcast_object_list(chosen)[0]
        if self.acc.is_main_process:
            path.write_text(json.dumps(dataclasses.asdict(chosen)))
        return chosen

    def autocast(self) -> torch.autocast:
        """BF16 for what is not an FP8 GEMM, where the precision choice says so."""
        return self.precision.autocast_context(self.acc.device)

    # ---------------------------------------------------------------------------------------- one step
    def _weights(self, tokens: int) -> tuple[float, float, float]:
        """(lambda, gamma, alpha) for the balancing mode of the run."""
        s, mode = self.cfg.schedule, self.cfg.balancing
        alpha = {"aux_free": s.balance_alpha, "aux_loss": self.cfg.aux_loss_alpha, "none": 0.0}[mode]
        gamma = s.gamma(tokens) if mode == "aux_free" else 0.0
        return s.mtp_lambda(tokens), gamma, alpha

    def step(self) -> dict:
        cfg, st, world = self.cfg, self.state, self.acc.num_processes
        unit = cfg.micro_batch * world
        size = cfg.schedule.batch_size(st["tokens"], unit)
        lam, gamma, alpha = self._weights(st["tokens"])
        lr = cfg.schedule.lr(st["step"], st["tokens"])
        for group in self.opt.param_groups:
            group["lr"] = lr
        local = self.train.batch(st["position"], size, cfg.seed).chunk(world)[self.acc.process_index]
        micro = local.split(cfg.micro_batch)
        sums = torch.zeros(3)
        self.model.train()
        for i, seqs in enumerate(micro):
            inputs, targets = self.train.inputs_targets(seqs.to(self.acc.device))
            docs = self.train.documents(inputs) if cfg.document_mask else None
            sync = nullcontext() if i == len(micro) - 1 else self.acc.no_sync(self.model)
            with sync:
                with self.autocast():
                    out = self.model(inputs, targets, mtp_weight=lam, balance_alpha=alpha, documents=docs)
                self.acc.backward(out.loss / len(micro))
            sums += torch.stack([out.lm_loss, out.mtp_loss, out.balance_loss]).float().cpu() / len(micro)
        losses = self.acc.reduce(sums.to(self.acc.device), "mean").cpu()
        loss = float(losses[0])
        for callback in self.callbacks:
            loss = callback.on_loss(self, loss)
        metrics = {"loss": loss, "mtp_loss": float(losses[1]), "balance_loss": float(losses[2]), "lr": lr,
                   "mtp_lambda": lam, "bias_gamma": gamma, "batch_sequences": size}
        if self._guard(loss):
            metrics.update(self._apply_update(gamma))
        st = self.state  # a rollback replaced it; the bad batch is still consumed, so training moves past it
        st["position"] += size
        st["tokens"] += size * self.train.seq_len
        st["step"] += 1
        return metrics

    def _guard(self, loss: float) -> bool:
        """True when the update may be applied; otherwise skip it, and roll back after max_skips."""
        st, g = self.state, self.cfg.guards
        # (a checkpoint from before the count: a mean it has is settled)
        seen = st.get("ema_steps", 0 if st["ema"] is None else g.history)
        spike = seen >= g.history and loss > g.spike_factor * st["ema"]
        if math.isfinite(loss) and not spike:
            weight = 1 / (seen + 1) if seen < g.history else 1 - g.ema  # the plain mean first
            st["ema"] = loss if st["ema"] is None else st["ema"] + weight * (loss - st["ema"])
            st["ema_steps"] = seen + 1
            st["skips"] = 0
            return True
        self.opt.zero_grad(set_to_none=True)
        for moe in self.raw.moe_layers():
            moe.loads.zero_()
        st["skips"] += 1
        st["skipped_total"] += 1
        self.monitor.event(st["step"], f"skipped update: loss {loss:.4g} (running mean {st['ema']})")
        if st["skips"] >= g.max_skips:
            self._rollback()
        return False

    def _rollback(self) -> None:
        found = checkpoint.latest(self.run_dir / "checkpoints")
        if found is None:
            raise RuntimeError(f"{self.cfg.guards.max_skips} bad steps in a row and no checkpoint to roll back to")
        keep = {k: self.state[k] for k in ("position", "skipped_total", "rollbacks")}
        self.state = checkpoint.load(found, self.raw, self.opt.optimizer)
        self.state.update(keep, rollbacks=keep["rollbacks"] + 1, skips=0)  # skip past the bad data
        self.monitor.event(self.state["step"], f"rolled back to {found.name}")

    def _apply_update(self, gamma: float) -> dict:
        grad_norm = float(self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loads = []
        for moe in self.raw.moe_layers():
            moe.loads.copy_(self.acc.reduce(moe.loads, "sum"))  # the global batch's loads
            loads.append(moe.update_bias(gamma))
        self.monitor.loads = loads
        return {"grad_norm": grad_norm}

    # ------------------------------------------------------------------------------------------ the run
    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        total, count = 0.0, 0
        for i in range(min(self.cfg.eval_batches, math.ceil(self.val.size / self.cfg.micro_batch))):
            idx = torch.arange(i * self.cfg.micro_batch, min((i + 1) * self.cfg.micro_batch, self.val.size))
            inputs, targets = self.val.inputs_targets(self.val.rows(idx.numpy()).to(self.acc.device))
            docs = self.val.documents(inputs) if self.cfg.document_mask else None  # attended as in training
            with self.autocast():
                logits = self.raw(inputs, documents=docs)
            valid = targets != IGNORE
            total += float(torch.nn.functional.cross_entropy(logits[valid].float(), targets[valid], reduction="sum"))
            count += int(valid.sum())
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50))}

    def save(self) -> None:
        checkpoint.save(self.run_dir / "checkpoints", self.state["step"], self.raw, self.opt.optimizer,
                        {k: v for k, v in self.state.items() if k != "step"}, self.cfg.keep_checkpoints,
                        write=self.acc.is_main_process)
        self.acc.wait_for_everyone()

    def full_model(self) -> Transformer | None:
        """An unsharded copy of the model on rank 0 (collective; None on the other ranks), for decoding and export."""
        weights = checkpoint.full_model_state(self.raw)
        if not self.acc.is_main_process:
            return None
        model = Transformer(self.model_cfg)
        model.load_state_dict(weights)
        set_attention_kernel(model, self.cfg.attention)
        return model.to(self.acc.device)

    def run(self) -> dict:
        cfg = self.cfg
        while self.state["tokens"] < cfg.schedule.total_tokens:
            for callback in self.callbacks:
                callback.on_step_begin(self)
            metrics = self.step()
            st = self.state  # not cached across steps: a rollback replaces the state
            self.monitor.step(st, metrics, force=st["step"] % cfg.log_every == 0)
            if st["step"] % cfg.eval_every == 0:
                self.monitor.log(st["step"], self.evaluate())
            if st["step"] % cfg.figure_every == 0:
                self.monitor.figure(st["step"])
            if st["step"] % cfg.checkpoint_every == 0:
                self.save()
        st = self.state
        final = {**self.evaluate(), "steps": st["step"], "tokens": st["tokens"], "autocast": self.precision.autocast,
                 "skipped_steps": st["skipped_total"], "rollbacks": st["rollbacks"]}
        last = checkpoint.latest(self.run_dir / "checkpoints")
        if last is None or last.name != f"step_{st['step']:06d}":
            self.save()
        self.monitor.log(st["step"], final)
        self.monitor.figure(st["step"])
        model = self.full_model()
        if self.acc.is_main_process:
            final.update(self.monitor.summary())
            if self.model_cfg.mtp_depth:
                final.update(mtp_acceptance(model, self.val, self.cfg.mtp_eval_prompts))
            if cfg.export_hf:
                from v3flow.model.hf_format import export_hf

                export_hf(model, self.run_dir / "hf", Path(self.spec.tokenizer))
            (self.run_dir / "final.json").write_text(json.dumps(final, indent=2))
        self.acc.wait_for_everyone()
        return final


def main(argv: list[str]) -> None:
    run_dir = Path(argv[0])
    started = time.time()
    trainer = Trainer(run_dir, load_callbacks(os.environ.get(CALLBACKS_ENV)))
    result = trainer.run()
    print(f"{trainer.tag} done in {time.time() - started:.0f}s: {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
