"""Study: FP8 training against BF16 (report §3.3, B.1), and why fine-grained scaling (B.2).

    .venv/bin/python benchmarks/study_fp8.py --config configs/tiny.yaml

(a) Runs the pipeline's pretrain stage with pretrain.precision = fp8 and = bf16 (through Prefect, each a
    child run in MLflow; same seed, same data, data from the cache) and compares the final training loss
    (mean of the last 10 % of steps) and the final validation loss. The report's claim: relative error
    below 0.25 %.
(b) On the FP8-trained model, takes the real inputs of every FP8 linear layer on validation sequences
    (forward hooks), plants no outliers (they are the activations' own) and measures the relative error
    ||x - deq(q(x))|| / ||x|| of 1x128 tiles, 128x128 blocks and one per-tensor scale; likewise for the
    weights (128x128 blocks against per-tensor).
Logs a study run (experiment `v3flow-benchmarks`) with the numbers and a figure (loss curves, error bars),
and prints a markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

PRECISIONS = ("fp8", "bf16")


def run_variant(config: str, precision: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "v3flow.cli", "run", config, "--stages", "pretrain", "--json",
           "--set", f"pretrain.precision={precision}", *sum((["--set", e] for e in extra), [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])["pretrain"]


def curve(out_dir: Path) -> dict[int, float]:
    rows = {r["step"]: r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())}
    return {step: r["loss"] for step, r in sorted(rows.items())}


def final_train_loss(losses: dict[int, float], share: float = 0.1) -> float:
    values = list(losses.values())
    return statistics.mean(values[-max(1, int(len(values) * share)):])


@torch.no_grad()
def quantization_errors(out_dir: Path, batches: int = 2) -> dict[str, float]:
    """Relative FP8 error of tiles / blocks / per-tensor on the real inputs and weights of the FP8 layers."""
    from safetensors.torch import load_file
    from v3flow.stages.pretrain.checkpoint import latest
    from v3flow.stages.pretrain.data import PackedSequences

    from v3flow.model.args import ModelConfig
    from v3flow.model.fp8 import FP8Linear, convert_to_fp8, fake_quantize
    from v3flow.model.transformer import Transformer

    spec = json.loads((out_dir / "run.json").read_text())
    model = Transformer(ModelConfig(**spec["model"]))
    model.load_state_dict(load_file(str(latest(out_dir / "checkpoints") / "model.safetensors")))
    convert_to_fp8(model).eval()
    inputs: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach().flatten(0, -2)))
             for m in model.modules() if isinstance(m, FP8Linear)]
    val = PackedSequences(Path(spec["manifest"]), "val")
    model(val.rows(torch.arange(min(batches, val.size)).numpy())[:, :-1])
    for h in hooks:
        h.remove()

    def rel(x: torch.Tensor, granularity: str) -> float:
        return float((fake_quantize(x, granularity) - x).norm() / x.norm().clamp(min=1e-30))

    weights = [m.weight.detach() for m in model.modules() if isinstance(m, FP8Linear)]
    out = {f"act_{g}_rel_error": statistics.mean(rel(x, g) for x in inputs) for g in ("tile", "block", "tensor")}
    out.update({f"weight_{g}_rel_error": statistics.mean(rel(w, g) for w in weights) for g in ("block", "tensor")})
    kurt = [float(((x - x.mean()) ** 4).mean() / x.var() ** 2) for x in inputs]
    out["act_max_over_std"] = statistics.mean(float(x.abs().max() / x.std()) for x in inputs)
    out["act_kurtosis"] = statistics.mean(kurt)
    return out


def figure(curves: dict[str, dict[int, float]], errors: dict[str, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        a.plot(list(c), list(c.values()), label=name)
    a.set(xlabel="step", ylabel="training loss (nats)", title="FP8 vs BF16 training, same seed and data")
    a.legend()
    labels = ["act 1x128", "act 128x128", "act tensor", "weight 128x128", "weight tensor"]
    keys = ["act_tile", "act_block", "act_tensor", "weight_block", "weight_tensor"]
    b.bar(labels, [errors[f"{k}_rel_error"] for k in keys], color=["C2", "C1", "C3", "C1", "C3"])
    b.set(ylabel="relative error ||x - deq(q(x))|| / ||x||", title="E4M3 error by scaling granularity")
    b.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    results = {p: run_variant(args.config, p, args.overrides) for p in PRECISIONS}
    curves = {p: curve(Path(r["out_dir"])) for p, r in results.items()}
    summary = {}
    for p, r in results.items():
        summary[f"{p}_final_train_loss"] = final_train_loss(curves[p])
        summary[f"{p}_final_val_loss"] = r["metrics"]["final_val_loss"]
    for kind in ("train", "val"):
        bf16 = summary[f"bf16_final_{kind}_loss"]
        summary[f"rel_gap_{kind}"] = (summary[f"fp8_final_{kind}_loss"] - bf16) / bf16
    summary.update(quantization_errors(Path(results["fp8"]["out_dir"])))
    summary["tile_vs_tensor_error_ratio"] = summary["act_tensor_rel_error"] / summary["act_tile_rel_error"]

    from record import record

    record("study_fp8", summary, {"benchmark": "study_fp8"},
           {"config": args.config, **{f"{p}_run": r["mlflow_run_id"] for p, r in results.items()}},
           figures={"fp8_vs_bf16.png": figure(curves, summary)})
    table = ["| | FP8 | BF16 | relative gap |", "|---|---|---|---|"]
    for kind, label in (("train", "final training loss (last 10 % of steps)"), ("val", "final validation loss")):
        table.append(f"| {label} | {summary[f'fp8_final_{kind}_loss']:.4f} | {summary[f'bf16_final_{kind}_loss']:.4f} "
                     f"| {summary[f'rel_gap_{kind}']:+.3%} |")
    table += ["", "| relative E4M3 error | 1x128 tiles | 128x128 blocks | per tensor |", "|---|---|---|---|",
              f"| activations (real inputs of the FP8 layers) | {summary['act_tile_rel_error']:.4f} | "
              f"{summary['act_block_rel_error']:.4f} | {summary['act_tensor_rel_error']:.4f} |",
              f"| weights | | {summary['weight_block_rel_error']:.4f} | {summary['weight_tensor_rel_error']:.4f} |"]
    print("\n".join(table))
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/study_fp8.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()
