"""Precision fits the machine: where a BF16 matmul is slower than FP32 (CPUs without BF16 units), FP8 runs
its non-GEMM work in FP32; the choice is explained and recorded."""

from __future__ import annotations

import pytest
import torch

from v3flow.training import precision

CPU = torch.device("cpu")


@pytest.fixture
def speeds(monkeypatch):
    def set_speeds(bf16: float, fp32: float) -> None:
        monkeypatch.setattr(precision, "matmul_gflops", lambda device_type: (bf16, fp32))
    return set_speeds


def test_fp8_uses_fp32_outside_its_gemms_where_bf16_is_slow(speeds):
    speeds(2.1, 317.0)  # measured on an AVX2-only x86 CPU
    p = precision.choose("fp8", "auto", CPU)
    assert (p.gemms, p.autocast) == ("fp8", "float32")
    assert "BF16 is slow here (2.1 vs 317.0 GFLOP/s" in p.reason
    assert p.as_params()["precision.autocast"] == "float32" and p.as_params()["precision.bf16_gflops"] == "2.1"
    assert not p.autocast_context(CPU)._enabled  # no BF16 autocast at all


def test_fp8_uses_bf16_where_it_is_fast_and_explicit_choices_win(speeds):
    speeds(1067.0, 328.0)  # AMX
    assert precision.choose("fp8", "auto", CPU).autocast == "bfloat16"
    assert precision.choose("fp8", "fp32", CPU).autocast == "float32"
    speeds(2.1, 317.0)
    assert precision.choose("fp8", "bf16", CPU).autocast == "bfloat16"  # as asked
    assert precision.choose("fp32", "auto", CPU).autocast == "float32"
    with pytest.warns(UserWarning, match="training will be slow"):
        assert precision.choose("bf16", "auto", CPU).autocast == "bfloat16"


def test_the_probe_measures_both_dtypes():
    bf16, fp32 = precision.matmul_gflops("cpu")
    assert bf16 > 0 and fp32 > 0
