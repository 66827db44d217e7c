"""Study: FP8 training against BF16 (report §3.3, B.1), and why fine-grained scaling (B.2).

    .venv/bin/python benchmarks/study_fp8.py --config configs/tiny.yaml

(a) Runs the pipeline's pretrain stage with pretrain.precision = fp8 and = bf16 (through Prefect, each a
    child run in MLflow; same seed, same data, data from the cache) and compares the final training loss
    (mean of the last 10 % of steps) and the final validation loss. The report's claim: relative error
    below 0.25 %.
(b) On the FP8-trained model, takes the real inputs of every FP8 linear layer on validation sequences
    (forward hooks) and measures the per-token relative error of 1x128 tiles, 128x128 blocks and one
    per-tensor scale, on the activations as they are and with one channel scaled by 10..10^5 (the
    massive activations of large LLMs, which a toy model does not grow); likewise for the weights.
Logs a study run (experiment `v3flow-benchmarks`) with the numbers and a figure (loss curves, error bars),
and prints a markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
from study import run_pretrain, write_table

from v3flow.model.fp8 import fake_quantize

PRECISIONS = ("fp8", "bf16")


def curve(out_dir: Path) -> dict[int, float]:
    rows = {r["step"]: r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())}
    return {step: r["loss"] for step, r in sorted(rows.items())}


def final_train_loss(losses: dict[int, float], share: float = 0.1) -> float:
    values = list(losses.values())
    return statistics.mean(values[-max(1, int(len(values) * share)):])


OUTLIER_FACTORS = (1, 10, 100, 1000, 10000, 100000)  # 1: the activations as they are


@torch.no_grad()
def layer_inputs(out_dir: Path, batches: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The real inputs [tokens, K] and the weights of every FP8 linear layer of the trained model."""
    from safetensors.torch import load_file

    from v3flow.model.args import ModelConfig
    from v3flow.model.fp8 import FP8Linear, convert_to_fp8
    from v3flow.model.transformer import Transformer
    from v3flow.training.checkpoint import latest
    from v3flow.training.data import PackedSequences

    spec = json.loads((out_dir / "run.json").read_text())
    model = Transformer(ModelConfig(**spec["model"]))
    model.load_state_dict(load_file(str(latest(out_dir / "checkpoints") / "model.safetensors")))
    convert_to_fp8(model).eval()
    inputs: list[torch.Tensor] = []
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    hooks = [m.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach().flatten(0, -2)))
             for m in layers]
    val = PackedSequences(Path(spec["manifest"]), "val")
    model(val.rows(torch.arange(min(batches, val.size)).numpy())[:, :-1])
    for h in hooks:
        h.remove()
    return inputs, [m.weight.detach() for m in layers]


def token_error(x: torch.Tensor, granularity: str, keep: torch.Tensor) -> float:
    """Mean over tokens of ||x_t - deq(q(x_t))|| / ||x_t||, over the channels in `keep` (the ordinary ones)."""
    err = (fake_quantize(x, granularity) - x)[:, keep].norm(dim=1)
    return float((err / x[:, keep].norm(dim=1).clamp(min=1e-30)).mean())


@torch.no_grad()
def quantization_errors(out_dir: Path) -> tuple[dict[str, float], dict[str, list[float]]]:
    """E4M3 error of 1x128 tiles, 128x128 blocks and one per-tensor scale on the real layer inputs, as they
    are and with one channel scaled by 10..10^5, the massive activations large LLMs develop; the error is
    measured on the other channels, the ones an outlier's scale squeezes towards FP8's subnormals."""
    inputs, weights = layer_inputs(out_dir)
    out, sweep = {}, {g: [] for g in ("tile", "block", "tensor")}
    for f in OUTLIER_FACTORS:
        for g, curve in sweep.items():
            errors = []
            for x in inputs:
                keep = torch.ones(x.shape[1], dtype=torch.bool)
                planted = x.clone()
                if f > 1:
                    channels = torch.tensor([3])
                    planted[:, channels] *= f
                    keep[channels] = False
                errors.append(token_error(planted, g, keep))
            curve.append(statistics.mean(errors))
    for g, values in sweep.items():
        out[f"act_{g}_rel_error"] = values[0]
        for f, v in zip(OUTLIER_FACTORS[1:], values[1:]):
            out[f"act_{g}_rel_error_outliers_x{f}"] = v
    for g in ("block", "tensor"):
        out[f"weight_{g}_rel_error"] = statistics.mean(
            float((fake_quantize(w, g) - w).norm() / w.norm()) for w in weights)
    out["act_max_over_std"] = statistics.mean(float(x.abs().max() / x.std()) for x in inputs)
    return out, sweep


def figure(curves: dict[str, dict[int, float]], sweep: dict[str, list[float]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        a.plot(list(c), list(c.values()), label=name)
    a.set(xlabel="step", ylabel="training loss (nats)", title="FP8 vs BF16 training, same seed and data")
    a.legend()
    for g, label in (("tile", "1x128 tiles"), ("block", "128x128 blocks"), ("tensor", "per tensor")):
        b.plot(OUTLIER_FACTORS, sweep[g], marker="o", label=label)
    b.set(xscale="log", yscale="log", xlabel="outlier channels scaled by (1 = real activations)",
          ylabel="per-token relative error, other channels", title="E4M3 error of the real layer inputs")
    b.legend()
    fig.tight_layout()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    results = {p: run_pretrain(args.config, [f"pretrain.precision={p}", *args.overrides]) for p in PRECISIONS}
    curves = {p: curve(Path(r["out_dir"])) for p, r in results.items()}
    summary = {}
    for p, r in results.items():
        summary[f"{p}_final_train_loss"] = final_train_loss(curves[p])
        summary[f"{p}_final_val_loss"] = r["metrics"]["final_val_loss"]
    for kind in ("train", "val"):
        bf16 = summary[f"bf16_final_{kind}_loss"]
        summary[f"rel_gap_{kind}"] = (summary[f"fp8_final_{kind}_loss"] - bf16) / bf16
    errors, sweep = quantization_errors(Path(results["fp8"]["out_dir"]))
    summary.update(errors)
    for suffix in ("", "_outliers_x1000", "_outliers_x100000"):
        summary[f"tensor_over_tile_error{suffix}"] = \
            summary[f"act_tensor_rel_error{suffix}"] / summary[f"act_tile_rel_error{suffix}"]

    from record import record

    record("study_fp8", summary, {"benchmark": "study_fp8"},
           {"config": args.config, **{f"{p}_run": r["mlflow_run_id"] for p, r in results.items()}},
           figures={"fp8_vs_bf16.png": figure(curves, sweep)})
    table = ["| | FP8 | BF16 | relative gap |", "|---|---|---|---|"]
    for kind, label in (("train", "final training loss (last 10 % of steps)"), ("val", "final validation loss")):
        table.append(f"| {label} | {summary[f'fp8_final_{kind}_loss']:.4f} | {summary[f'bf16_final_{kind}_loss']:.4f} "
                     f"| {summary[f'rel_gap_{kind}']:+.3%} |")
    table += ["", ("| E4M3 relative error (per token; real inputs of the FP8 layers) | 1x128 tiles | 128x128 blocks "
                   "| per tensor | per tensor / tiles |"), "|---|---|---|---|---|"]
    for f in OUTLIER_FACTORS:
        suffix = "" if f == 1 else f"_outliers_x{f}"
        label = "as they are" if f == 1 else f"channel 3 x{f}"
        tile, block, tensor = (summary[f"act_{g}_rel_error{suffix}"] for g in ("tile", "block", "tensor"))
        table.append(f"| activations, {label} | {tile:.4f} | {block:.4f} | {tensor:.4f} | {tensor / tile:.2f}x |")
    table.append(f"| weights | | {summary['weight_block_rel_error']:.4f} | {summary['weight_tensor_rel_error']:.4f} "
                 f"| |")
    write_table("study_fp8", table)


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()
