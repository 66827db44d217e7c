"""FP8 fine-grained quantization: error bounds per tile and block, edge shapes, the FP8 linear layer and
grouped expert GEMMs against high precision, the conversion, and the CUDA backend against the emulation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from v3flow.model import fp8
from v3flow.model.moe import Experts, grouped_mm

HALF_ULP = 2.0**-4  # E4M3: 3 mantissa bits -> relative rounding error <= 2^-4 for normal values
SUB_HALF = 2.0**-10  # half the smallest subnormal (2^-9), in units of the scale


def outliers(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x.view(-1)[torch.randint(0, x.numel(), (max(1, x.numel() // 500),), generator=g)] *= 300.0
    return x


def assert_within_fp8_bound(x, back, scale):
    """|x - deq(q(x))| <= max(|x| 2^-4, s 2^-10) elementwise, with s each element's own scale."""
    bound = torch.maximum(x.abs() * HALF_ULP, scale * SUB_HALF) * (1 + 1e-6)
    assert bool(((x - back).abs() <= bound).all()), float(((x - back).abs() - bound).max())


@pytest.mark.parametrize("shape", [(4, 128), (3, 5, 256), (7, 1), (2, 127), (2, 129), (1, 1000)])
def test_tile_quantization_error_bound_and_shapes(shape):
    x = outliers(*shape)
    q, s = fp8.quantize_tiles(x)
    k = shape[-1]
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert q.shape[-1] == -(-k // 128) * 128 and s.shape == (*shape[:-1], -(-k // 128))
    assert float(q.float().abs().max()) <= 448.0
    per_elem = s.repeat_interleave(128, dim=-1)[..., :k]
    assert_within_fp8_bound(x, fp8.dequantize_tiles(q, s, k), per_elem)
    # each tile's max |x| maps onto the top of the E4M3 range
    amax = fp8._pad(x, -1).unflatten(-1, (-1, 128)).abs().amax(-1)
    assert torch.allclose(s, amax / 448.0)


@pytest.mark.parametrize("shape", [(128, 128), (256, 384), (130, 7), (1, 300), (3, 129, 140)])
def test_block_quantization_error_bound_and_shapes(shape):
    w = outliers(*shape, seed=1)
    q, s = fp8.quantize_blocks(w)
    n, k = shape[-2:]
    assert s.shape == (*shape[:-2], -(-n // 128), -(-k // 128))
    per_elem = s.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :n, :k]
    assert_within_fp8_bound(w, fp8.dequantize_blocks(q, s, w.shape), per_elem)


def test_zero_tiles_and_huge_values_stay_finite():
    x = torch.zeros(2, 256)
    x[1, 200] = 1e30
    q, s = fp8.quantize_tiles(x)
    back = fp8.dequantize_tiles(q, s)
    assert torch.isfinite(back).all() and float(back[0].abs().max()) == 0.0
    assert float(back[1, 200]) == pytest.approx(1e30, rel=2**-4)


def test_fine_grained_scaling_beats_per_tensor_with_outliers():
    x = outliers(512, 1024)
    err = {g: float((fp8.fake_quantize(x, g) - x).norm() / x.norm()) for g in ("tile", "block", "tensor")}
    assert err["tile"] < err["block"] < err["tensor"]
    assert err["tensor"] > 3 * err["tile"]


def test_fp8_linear_matches_high_precision_forward_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(6, 50, 200, requires_grad=True)  # K = 200 and N = 300: both padded
    w = (torch.randn(300, 200) * 0.05).requires_grad_()
    y = fp8.fp8_linear(x, w)
    ref = x @ w.t()
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert float((y - ref).norm() / ref.norm()) < 0.05
    dy = torch.randn_like(ref)
    (y * dy).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the BF16 baseline
        ((x @ w.t()).float() * dy).sum().backward()
    for got, want in ((gx, x.grad), (gw, w.grad)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert float((got - want).norm() / want.norm()) < 0.05
    assert w.grad.dtype == torch.float32


def test_fp8_linear_returns_bf16_under_autocast():
    x, w = torch.randn(4, 128), torch.randn(64, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8.fp8_linear(x, w)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32


def test_group_tiles_never_span_two_experts():
    offsets = torch.tensor([0, 130, 130, 300, 301], dtype=torch.int32)
    tile, count = fp8._group_tiles(torch.zeros(301, 1), offsets)
    group = torch.searchsorted(offsets.long(), torch.arange(301), right=True)
    for t in tile.unique():
        assert group[tile == t].unique().numel() == 1
    assert int(count) == 2 + 2 + 1  # 130 rows -> 2 tiles, 170 -> 2, 1 -> 1


def test_fp8_grouped_mm_matches_grouped_mm_with_empty_groups():
    torch.manual_seed(0)
    x = torch.randn(300, 64, requires_grad=True)
    w = (torch.randn(4, 96, 64) * 0.1).requires_grad_()  # [G, N, K] master layout
    offsets = torch.tensor([100, 100, 260, 300], dtype=torch.int32)
    y = fp8.fp8_grouped_mm(x, w.transpose(1, 2), offsets)
    ref = grouped_mm(x, w.transpose(1, 2), offsets)
    assert float((y - ref).norm() / ref.norm()) < 0.05
    dy = torch.randn_like(ref)
    (y * dy).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (grouped_mm(x, w.transpose(1, 2), offsets) * dy).sum().backward()
    assert float((gx - x.grad).norm() / x.grad.norm()) < 0.05
    assert float((gw - w.grad).norm() / w.grad.norm()) < 0.05
    assert float(gw[1].abs().max()) == 0.0  # the empty expert gets no gradient


def test_convert_keeps_head_and_parameters(model):
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp8.convert_to_fp8(model)
    assert type(model.head) is nn.Linear
    assert isinstance(model.layers[0].attn.wq_a, fp8.FP8Linear)
    assert all(m.matmul is fp8.fp8_grouped_mm for m in model.modules() if isinstance(m, Experts))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens[:, :-1], tokens[:, 1:], mtp_weight=0.3)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_backend_matches_emulation():
    assert fp8.cuda_blockwise_ok(0), "blockwise scaled_mm unavailable on this GPU"
    for m, k, n in ((256, 512, 384), (100, 300, 130), (4096, 7168, 2048)):
        a, b = outliers(m, k).cuda(), (outliers(n, k, seed=2) * 0.02).cuda()
        recipes = ((fp8.quantize_blocks, fp8.gemm_tiles_blocks), (fp8.quantize_tiles, fp8.gemm_tiles_tiles))
        for quantize_b, gemm in recipes:
            (aq, a_s), (bq, b_s) = fp8.quantize_tiles(fp8._pad(a, 0, 16)), quantize_b(fp8._pad(b, 0, 16))
            got = gemm(aq, a_s, bq, b_s, backend="cuda")
            want = gemm(aq, a_s, bq, b_s, backend="emulated")
            assert float((got - want).abs().max() / want.abs().max()) < 1e-3, (m, k, n, gemm.__name__)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fp8_linear_on_gpu_matches_cpu_emulation():
    """All three GEMMs (scaled_mm on the GPU) against the CPU backend: same numerics."""
    x, w, dy = outliers(3, 70, 300), outliers(200, 300, seed=3) * 0.05, torch.randn(3, 70, 200)
    results = []
    for device in ("cpu", "cuda"):
        xd, wd = (t.detach().clone().to(device).requires_grad_() for t in (x, w))
        (fp8.fp8_linear(xd, wd) * dy.to(device)).sum().backward()
        results.append([t.detach().cpu() for t in (fp8.fp8_linear(xd, wd), xd.grad, wd.grad)])
    for cpu, gpu in zip(*results):
        assert float((cpu - gpu).abs().max() / cpu.abs().max()) < 1e-3


def test_fp32_rounding_is_the_e4m3_cast_bit_for_bit():
    """The emulation rounds in FP32 arithmetic; it must give exactly what the float8 cast gives: every ~1000th
    FP32 bit pattern up to 448, every E4M3 value, every midpoint between two (ties) and its neighbours."""
    bits = torch.arange(0, 0x43E00001, 997, dtype=torch.int64).to(torch.int32)
    grid = torch.arange(256, dtype=torch.uint8).view(fp8.E4M3).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].sort().values
    mid = (grid[:-1] + grid[1:]) / 2
    near = [mid, torch.nextafter(mid, torch.full_like(mid, 1e9)), torch.nextafter(mid, torch.zeros_like(mid)), grid,
            torch.tensor([449.0, 470.0, 1e30, 1e-40, 0.0])]
    values = torch.cat([bits.view(torch.float32), *near])
    values = torch.cat([values, -values])
    want = values.clamp(-448, 448).to(fp8.E4M3).float()
    got = fp8.round_to_e4m3(values.clone())
    assert torch.equal(got, want), values[got != want][:5]


def test_weight_quantized_once_per_version():
    w = torch.nn.Parameter(torch.randn(256, 128))
    first = fp8.cached_weight(w, fp8.fake_blocks)
    assert fp8.cached_weight(w, fp8.fake_blocks) is first  # the next micro-batch reuses it
    with torch.no_grad():
        w.mul_(2)  # an optimizer step
    second = fp8.cached_weight(w, fp8.fake_blocks)
    assert second is not first and torch.equal(second, first * 2)
    assert torch.equal(fp8.cached_weight(w.t(), fp8.fake_blocks), fp8.fake_blocks(w.detach().t()))  # a view
