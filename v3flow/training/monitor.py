"""What an engineer watches during pretraining: losses, LR, gradient norm, tokens/s, MFU, expert balance.

Rank 0 appends every step to metrics.jsonl (the exact-resume test compares these files) and sends them to
the stage's MLflow run (MLFLOW_RUN_ID) every `log_every` steps, with a figure of the expert loads per layer.
MFU is model FLOPs per second over the machine's measured peak of a large fp32/bf16 matrix product.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from v3flow.model.moe import max_violation
from v3flow.model.params import count_parameters


def training_flops_per_token(model, seq_len: int) -> float:
    """6 x activated matmul weights (main, MTP and both heads) + causal attention scores and values."""
    cfg = model.cfg
    p = count_parameters(cfg)
    mtp_active = p.mtp_unique - cfg.mtp_depth * (cfg.n_routed_experts - cfg.n_activated_experts) * 3 * cfg.dim \
        * cfg.moe_inter_dim + cfg.mtp_depth * p.embedding  # + the shared head once per depth
    dense = p.activated - p.embedding + mtp_active
    layers = cfg.n_layers + cfg.mtp_depth
    attention = 6 * layers * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    return 6 * dense + attention


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: allocated GPU memory on CUDA, the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measured_peak_flops(device: torch.device | str = "cpu", reps: int = 8) -> float:
    """FLOP/s of a large matrix product: fp32 1024^3 on CPU, bf16 8192^3 on a GPU (the usual MFU base).
    The fastest of `reps` timings, so a moment of contention on a shared machine does not lower the peak."""
    gpu = torch.device(device).type == "cuda"
    n, dtype = (8192, torch.bfloat16) if gpu else (1024, torch.float32)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class Monitor:
    def __init__(self, run_dir: Path, model, main: bool, seq_len: int, device: torch.device, tag: str = "[pretrain]"):
        self.main, self.model, self.tag, self.device = main, model, tag, torch.device(device)
        self.file = run_dir / "metrics.jsonl"
        self.uri, self.run_id = os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_RUN_ID") or None
        self.flops_per_token = training_flops_per_token(model, seq_len)
        self.peak = measured_peak_flops(device) if main else 1.0
        self.loads: list[torch.Tensor] = []
        self.window = (time.perf_counter(), 0)
        self.last: dict = {}

    def step(self, state: dict, metrics: dict, force: bool) -> None:
        if not self.main:
            return
        maxvio = [max_violation(loads) for loads in self.loads]
        metrics.update({f"maxvio_layer_{i}": v for i, v in enumerate(maxvio)})
        if maxvio:
            metrics["maxvio_mean"] = sum(maxvio) / len(maxvio)
        if force:
            start, tokens0 = self.window
            now = time.perf_counter()
            rate = (state["tokens"] - tokens0) / max(now - start, 1e-9)
            self.window = (now, state["tokens"])
            metrics.update(tokens_per_s=rate, mfu=rate * self.flops_per_token / self.peak,
                           peak_memory_gb=peak_memory_gb(self.device))
            self.log(state["step"], metrics)
            print(f"{self.tag} step {state['step']:5d}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
                  f"{rate:,.0f} tok/s  MFU {metrics['mfu']:.1%}  peak memory {metrics['peak_memory_gb']:.2f} GB",
                  flush=True)
        record = {"step": state["step"], "tokens": state["tokens"], **metrics}
        with open(self.file, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.last = record

    def log(self, step: int, metrics: dict) -> None:
        if self.main and self.run_id:
            finite = {k: float(v) for k, v in metrics.items() if isinstance(v, float | int) and math.isfinite(v)}
            from v3flow import tracking  # imported only when logging: trainer processes need no MLflow otherwise

            tracking.log_metrics(self.uri, self.run_id, finite, step=step)
        if self.main and "val_loss" in metrics:
            print(f"{self.tag} step {step}: validation loss {metrics['val_loss']:.4f}", flush=True)

    def params(self, params: dict[str, str]) -> None:
        """Settings chosen at run time (e.g. the precision), as MLflow params and in run_params.json."""
        if not self.main:
            return
        path = self.file.with_name("run_params.json")
        path.write_text(json.dumps({**(json.loads(path.read_text()) if path.exists() else {}), **params}, indent=2))
        if self.run_id:
            from v3flow import tracking

            tracking.log_params(self.uri, self.run_id, params)

    def event(self, step: int, text: str) -> None:
        if self.main:
            print(f"{self.tag} step {step}: {text}", flush=True)
            with open(self.file.with_name("events.log"), "a") as f:
                f.write(f"{step}\t{text}\n")
            if self.run_id:
                self.log(step, {"guard_events": 1.0})

    def figure(self, step: int) -> None:
        if not (self.main and self.run_id and self.loads):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from v3flow import tracking

        loads = torch.stack([x / x.float().mean().clamp(min=1e-9) for x in self.loads]).numpy()
        fig, ax = plt.subplots(figsize=(8, 1 + 0.5 * len(loads)))
        im = ax.imshow(loads, aspect="auto", cmap="viridis")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"expert load / mean load, step {step}")
        fig.colorbar(im, ax=ax)
        tracking.log_figure(self.uri, self.run_id, fig, f"expert_loads/step_{step:06d}.png")
        plt.close(fig)

    def summary(self) -> dict:
        return {k: v for k, v in self.last.items() if k.startswith("maxvio")}
