"""Training precision as the machine allows it.

    fp8    the report's FP8 GEMMs (v3flow/model/fp8.py, 1x128 / 128x128 scaling) for every linear layer but the
           output head; what is not an FP8 GEMM runs in BF16 where BF16 is fast, else in FP32
    bf16   BF16 autocast everywhere (as asked, even where it is slow: a warning says so)
    fp32   no mixed precision
Master weights and gradients are FP32 in all three.

Many CPUs have no BF16 matrix units (AVX2-only x86: most laptops and many cloud VMs). There a BF16 matmul
ran at 0.3-2 GFLOP/s against 50-190 in FP32, so BF16 autocast made the FP8 demo crawl. `bf16_is_fast` times
one matmul of each dtype; `pretrain.high_precision: auto` uses BF16 only when it is at least as fast as FP32.
The FP8 numerics do not change either way: FP8 GEMMs accumulate in FP32 and return their input's dtype.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from v3flow.model.fp8 import convert_to_fp8


@dataclass(frozen=True)
class Precision:
    gemms: str  # "fp8" | "bf16" | "fp32"
    autocast: str  # dtype of the non-FP8 compute: "bfloat16" | "float32"
    reason: str  # why, for the logs and MLflow
    bf16_gflops: float = 0.0
    fp32_gflops: float = 0.0

    def as_params(self) -> dict[str, str]:
        return {f"precision.{k}": str(v) for k, v in asdict(self).items()}

    def autocast_context(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast == "bfloat16")


@functools.cache
def matmul_gflops(device_type: str) -> tuple[float, float]:
    """(BF16, FP32) GFLOP/s of a 512^3 matmul on this device: the fastest of 3 timings each."""
    if device_type == "cuda":
        return (float("inf"), 1.0)  # every GPU we train on has BF16 tensor cores
    n, out = 512, []
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        out.append(2 * n**3 / best / 1e9)
    return out[0], out[1]


def bf16_is_fast(device: torch.device) -> bool:
    bf16, fp32 = matmul_gflops(device.type)
    return bf16 >= fp32


def choose(precision: str, high_precision: str, device: torch.device) -> Precision:
    """What runs in which dtype; `high_precision` (auto | bf16 | fp32) is what fp8 uses outside its GEMMs."""
    bf16, fp32 = matmul_gflops(device.type) if device.type == "cpu" else (0.0, 0.0)
    speeds = {"bf16_gflops": round(bf16, 2), "fp32_gflops": round(fp32, 2)}
    if precision == "fp32":
        return Precision("fp32", "float32", "precision: fp32", **speeds)
    if precision == "bf16":
        if not bf16_is_fast(device):
            warnings.warn(f"precision bf16 on a device where a BF16 matmul runs at {bf16:.1f} GFLOP/s against "
                          f"{fp32:.1f} in FP32: training will be slow", stacklevel=2)
        return Precision("bf16", "bfloat16", "precision: bf16", **speeds)
    if high_precision == "auto":
        fast = bf16_is_fast(device)
        why = "BF16 is fast here" if fast else f"BF16 is slow here ({bf16:.1f} vs {fp32:.1f} GFLOP/s in FP32)"
        return Precision("fp8", "bfloat16" if fast else "float32", f"high_precision auto: {why}", **speeds)
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[high_precision]
    return Precision("fp8", dtype, f"high_precision: {high_precision}", **speeds)


def apply(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """FP8 GEMMs in place for fp8 (parameters and state dict unchanged); nothing for bf16 / fp32."""
    return convert_to_fp8(model) if precision.gemms == "fp8" else model
