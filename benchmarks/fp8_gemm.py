"""FP8 (blockwise 1x128 x 128x128, the report's scaling) against BF16 GEMM throughput on a GPU.

    python benchmarks/fp8_gemm.py [--tokens 8192] [--out results.json] [--no-record]

Shapes are DeepSeek-V3's: an expert's up/gate projection (7168 -> 2048) and down projection (2048 ->
7168), the dense layers' FFN (7168 -> 18432 and back), as y = x W^T with x [tokens, K]. For each it
times (a) the BF16 product, (b) the FP8 product of already-quantized operands (torch scaled_mm), and
(c) FP8 with the online quantization of the activations included (weights quantized once, as a training
step does per micro-batch), and (d) a whole linear layer's forward + backward (three GEMMs, all
quantization included): FP8Linear against nn.Linear under BF16 autocast. Median of CUDA-event timings
after warm-up. Results go to MLflow (experiment
`v3flow-benchmarks`) unless --no-record, and to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from v3flow.model import fp8

SHAPES = {"expert_up 7168->2048": (7168, 2048), "expert_down 2048->7168": (2048, 7168),
          "dense_up 7168->18432": (7168, 18432), "dense_down 18432->7168": (18432, 7168)}


def timed(fn, reps: int = 30) -> float:
    """Median milliseconds of fn() over reps runs after 5 warm-ups."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench(tokens: int, k: int, n: int) -> dict:
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    (xq, xs), (wq, ws) = fp8.quantize_tiles(x), fp8.quantize_blocks(w)
    flop = 2 * tokens * k * n
    ms = {"bf16": timed(lambda: x @ w.t()),
          "fp8": timed(lambda: fp8.gemm_tiles_blocks(xq, xs, wq, ws, torch.bfloat16, backend="cuda")),
          "fp8_with_quant": timed(lambda: fp8.gemm_tiles_blocks(*fp8.quantize_tiles(x), wq, ws, torch.bfloat16,
                                                                backend="cuda"))}
    out = {f"{name}_tflops": flop / t / 1e9 for name, t in ms.items()}
    out["speedup"] = ms["bf16"] / ms["fp8"]
    out["speedup_with_quant"] = ms["bf16"] / ms["fp8_with_quant"]
    layer = {}
    for name, cls in (("bf16", torch.nn.Linear), ("fp8", fp8.FP8Linear)):
        lin = cls(k, n, bias=False, device="cuda")
        xl = x.float().requires_grad_()

        def step(lin=lin, xl=xl):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = lin(xl)
            y.backward(torch.ones_like(y))

        layer[name] = timed(step, reps=10)
    out["layer_bf16_ms"], out["layer_fp8_ms"] = layer["bf16"], layer["fp8"]
    out["layer_speedup"] = layer["bf16"] / layer["fp8"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if not (torch.cuda.is_available() and fp8.cuda_blockwise_ok(0)):
        raise SystemExit("needs a Hopper GPU with blockwise torch scaled_mm")
    device = torch.cuda.get_device_name(0)
    summary = {}
    for name, (k, n) in SHAPES.items():
        r = bench(args.tokens, k, n)
        print(f"{name:24s} bf16 {r['bf16_tflops']:6.0f} TFLOP/s  fp8 {r['fp8_tflops']:6.0f} ({r['speedup']:.2f}x)  "
              f"fp8 + quantize {r['fp8_with_quant_tflops']:6.0f} ({r['speedup_with_quant']:.2f}x)  "
              f"layer fwd+bwd {r['layer_bf16_ms']:.2f} vs {r['layer_fp8_ms']:.2f} ms ({r['layer_speedup']:.2f}x)")
        key = name.split()[0]
        summary.update({f"{key}_{m}": v for m, v in r.items()})
    tags = {"benchmark": "fp8_gemm", "device": device, "torch": torch.__version__}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**tags, "tokens": args.tokens, **summary}, f, indent=2)
    if not args.no_record:
        from record import record

        record("fp8_gemm", summary, tags, {"tokens": str(args.tokens)})


if __name__ == "__main__":
    main()
