"""FP8 training with fine-grained quantization (report §3.3, Appendix B), applied from outside the model.

    activations, output gradients   1x128 tiles   (per token, per 128 channels along the GEMM's K)
    weights                         128x128 blocks
    scale per tile / block          s = amax / 448 (online, from the tile's own max |x|); q = e4m3(x / s)
    products                        accumulated in FP32, each K-group of 128 rescaled by s_a * s_b

All three GEMMs of a linear layer run in E4M3: Fprop y = x W^T, Dgrad dx = dy W, Wgrad dW = dy^T x. For
Wgrad both operands are tiled along the tokens (128x1 tiles of dy and x), so the FP8 copy of x cached by
the forward pass (in 1x128 tiles) is dequantized and re-tiled. Dimensions that are not multiples of 128
are zero-padded (padding changes neither the amax of a tile nor a product). Master weights and weight
gradients stay FP32; what the report keeps out of FP8 (embedding, output head, MoE gating, norms,
attention core) is never converted.

Two backends, one numerics: `emulated` dequantizes the FP8 values exactly (e4m3 x fp32 scale) and
multiplies in FP32 (any device; the only one on CPU); `cuda` runs `torch.nn.functional.scaled_mm` on
Hopper with BlockWise1x128 x BlockWise128x128 scaling (Fprop, Dgrad) and 1x128 x 1x128 (Wgrad), whose
kernels promote to FP32 per 128-wide K group (report §3.3.2). The cuda backend is chosen automatically
where a probe GEMM agrees with the emulation. The routed experts' grouped GEMMs, which PyTorch cannot
run in blockwise FP8, use the emulation on the GPU too. `convert_to_fp8(model)` is the one entry point.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from v3flow.model.moe import Experts, grouped_mm

E4M3 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
TILE = 128


# ------------------------------------------------------------------------------------- quantization
def _pad(x: torch.Tensor, dim: int, multiple: int = TILE) -> torch.Tensor:
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [0, extra]
    return F.pad(x, pad)


def _scale(amax: torch.Tensor) -> torch.Tensor:
    """FP32 scale mapping amax to the E4M3 maximum; an all-zero tile gets scale 1 (its values stay 0)."""
    amax = amax.float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def _cast(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # clamp before the cast: CPU casts saturate, other devices may not (REFERENCE-DETAIL §2.8);
    # row-major out whatever the input's strides (elementwise ops keep a transposed input's layout)
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(E4M3).contiguous()


def _fused_on_gpu(fn):
    """On CUDA run `fn` through torch.compile, which fuses the amax, scale, divide, clamp and cast into a
    few kernels instead of one pass over memory each; CPU (and any compile failure) runs it eagerly."""
    compiled = None

    @functools.wraps(fn)
    def run(x: torch.Tensor):
        nonlocal compiled
        if x.is_cuda and compiled is not False:
            try:
                compiled = compiled or torch.compile(fn, dynamic=True)
                return compiled(x)
            except Exception as err:  # noqa: BLE001 - no working compiler here: the eager ops, same arithmetic
                compiled = False
                warnings.warn(f"FP8 quantization runs eagerly: torch.compile failed ({err})", stacklevel=2)
        return fn(x)

    return run


@_fused_on_gpu
def quantize_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 tiles along the last dim. x: [..., K] -> q: e4m3 [..., Kp], s: fp32 [..., Kp/128] (Kp: K padded)."""
    g = _pad(x, -1).unflatten(-1, (-1, TILE))  # [..., Kp/128, 128]
    s = _scale(g.abs().amax(-1))
    return _cast(g, s[..., None]).flatten(-2), s


def dequantize_tiles(q: torch.Tensor, s: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Inverse of quantize_tiles, in fp32, cut back to k columns."""
    x = (q.float().unflatten(-1, (-1, TILE)) * s[..., None]).flatten(-2)
    return x if k is None else x[..., :k]


@_fused_on_gpu
def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 blocks over the last two dims. w: [..., N, K] -> q: e4m3 [..., Np, Kp], s: [..., Np/128, Kp/128]."""
    p = _pad(_pad(w, -1), -2)
    *lead, n, k = p.shape
    g = p.reshape(*lead, n // TILE, TILE, k // TILE, TILE)
    s = _scale(g.abs().amax(dim=(-3, -1)))  # [..., Np/128, Kp/128]
    return _cast(g, s[..., :, None, :, None]).reshape(p.shape), s


def dequantize_blocks(q: torch.Tensor, s: torch.Tensor, shape: torch.Size | None = None) -> torch.Tensor:
    *lead, n, k = q.shape
    w = (q.float().reshape(*lead, n // TILE, TILE, k // TILE, TILE) * s[..., :, None, :, None]).reshape(q.shape)
    return w if shape is None else w[..., : shape[-2], : shape[-1]]


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaling (one scale for everything): the coarse baseline the report improves on."""
    s = _scale(x.abs().amax())
    return _cast(x, s), s


def fake_quantize(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """x through FP8 and back at `granularity` (tile | block | tensor), for error studies."""
    if granularity == "tile":
        return fake_tiles(x)
    if granularity == "block":
        return fake_blocks(x)
    q, s = quantize_tensor(x)
    return q.float() * s


# ------------------------------------------------------------------------ the emulation's fake quantization
# The emulated GEMMs need only the values an E4M3 round trip gives (e4m3(x / s) * s), in FP32. On CPU the
# float8 -> float32 cast is not vectorised (~25x the cost of an elementwise op), so the rounding is done in
# FP32 arithmetic instead, bit for bit what the cast gives (tests/model/test_fp8.py sweeps every tie):
# with 2^e the binade of v (its exponent bits) but at least 2^-6 (E4M3's smallest normal), c = 1.5 * 2^(e+20)
# has an ulp of 2^(e-3), E4M3's step at v (3 mantissa bits; 2^-9 for subnormals), so (v + c) - c is v rounded
# to the nearest E4M3 value, ties to even, by the FPU's own rounding.
_EXPONENT_BITS = 0x7F800000


def round_to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """`v.clamp(-448, 448).to(float8_e4m3fn).float()`, computed in place in `v` (an FP32 tensor the caller owns)."""
    v = v.clamp_(-FP8_MAX, FP8_MAX)
    if not v.is_cpu:  # the cast is fast on accelerators
        return v.copy_(v.to(E4M3))
    c = (v.view(torch.int32) & _EXPONENT_BITS).view(torch.float32)  # 2^e
    c.clamp_min_(2.0**-6).mul_(1.5 * 2.0**20)
    return v.add_(c).sub_(c)


def fake_tiles(x: torch.Tensor) -> torch.Tensor:
    """dequantize_tiles(*quantize_tiles(x)) in one pass per step, FP32 [..., K]: x through FP8 in 1x128 tiles."""
    k = x.shape[-1]
    g = _pad(x.float(), -1).unflatten(-1, (-1, TILE))  # [..., Kp/128, 128]
    s = _scale(g.abs().amax(-1, keepdim=True))
    return round_to_e4m3(g / s).mul_(s).flatten(-2)[..., :k]


def fake_blocks(w: torch.Tensor) -> torch.Tensor:
    """dequantize_blocks(*quantize_blocks(w)), FP32 [..., N, K]: w through FP8 in 128x128 blocks."""
    n, k = w.shape[-2:]
    p = _pad(_pad(w.float(), -1), -2)
    g = p.unflatten(-1, (-1, TILE)).unflatten(-3, (-1, TILE))  # [..., Np/128, 128, Kp/128, 128]
    s = _scale(g.abs().amax(dim=(-3, -1), keepdim=True))
    return round_to_e4m3(g / s).mul_(s).reshape(p.shape)[..., :n, :k]


def fake_columns(x: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, C] through FP8 in 128x1 tiles (per channel, per 128 rows; with `offsets`, tiles restart at each
    group so none spans two experts): Wgrad's operands, whose K is the token dimension."""
    xf = x.float()
    if offsets is None:
        g = _pad(xf, 0).unflatten(0, (-1, TILE))  # [Mp/128, 128, C]
        s = _scale(g.abs().amax(1, keepdim=True))
        return round_to_e4m3(g / s).mul_(s).flatten(0, 1)[: x.shape[0]]
    tile, count = _group_tiles(x, offsets)
    amax = xf.new_zeros(int(count), x.shape[1])
    amax.scatter_reduce_(0, tile[:, None].expand_as(xf), xf.abs(), "amax")
    s = _scale(amax)[tile]
    return round_to_e4m3(xf / s).mul_(s)


_weight_cache = WeakIdKeyDictionary()


def cached_weight(w: torch.Tensor, quantize) -> object:
    """`quantize(w)` once per version of the parameter behind `w`: weights change only at optimizer steps
    (and loads), so every micro-batch's forward and backward of a step share one quantization."""
    base = w if w._base is None else w._base
    key = (base._version, base.data_ptr(), w.shape, w.stride(), w.storage_offset(), quantize)
    hit = _weight_cache.get(base)
    if hit is not None and hit[0] == key:
        return hit[1]
    out = quantize(w.detach())
    _weight_cache[base] = (key, out)
    return out


# ---------------------------------------------------------------------------------------------- GEMMs
@functools.cache
def cuda_blockwise_ok(device_index: int) -> bool:
    """Whether F.scaled_mm runs the blockwise recipes on this GPU (Hopper) and matches the emulation."""
    if not hasattr(F, "scaled_mm") or torch.cuda.get_device_capability(device_index) != (9, 0):
        return False
    try:
        dev = torch.device("cuda", device_index)
        gen = torch.Generator(device=dev).manual_seed(0)
        a, b = (torch.randn(256, 384, device=dev, generator=gen) for _ in range(2))
        (aq, a_s), (bq, b_s), (tq, t_s) = quantize_tiles(a), quantize_blocks(b), quantize_tiles(b)
        pairs = [(_scaled_mm_cuda(aq, a_s, bq, b_s, torch.float32), _emulated(aq, a_s, bq, b_s, torch.float32)),
                 (_scaled_mm_cuda(aq, a_s, tq, t_s, torch.float32, blocks=False),
                  _emulated(aq, a_s, tq, t_s, torch.float32, blocks=False))]
        return all(float((got - want).abs().max() / want.abs().max()) < 1e-3 for got, want in pairs)
    except Exception:  # noqa: BLE001 - any failure of the probe means: use the emulation
        return False


def _scaled_mm_cuda(aq, a_s, bq, b_s, out_dtype, blocks: bool = True):
    """a [M, Kp] in 1x128 tiles @ b^T, b [Np, Kp] in 128x128 blocks (blocks) or 1x128 tiles -> [M, Np].

    cuBLASLt's layouts: a's scales (M, Kp/128) column-major; block scales (round_up(Kp/128, 4), Np/128)
    with strides (1, that round-up); tile scales of b (Np, Kp/128) column-major. M and Np must be
    multiples of 16 (the callers pad rows with zeros before quantizing)."""
    if blocks:
        b_scale, kind = F.pad(b_s, (0, -b_s.shape[1] % 4)).t(), F.ScalingType.BlockWise128x128
    else:
        b_scale, kind = b_s.t().contiguous().t(), F.ScalingType.BlockWise1x128
    return F.scaled_mm(aq, bq.t(), a_s.t().contiguous().t(), F.ScalingType.BlockWise1x128, b_scale, kind,
                       output_dtype=out_dtype)


def _emulated(aq, a_s, bq, b_s, out_dtype, blocks: bool = True):
    """The same product from exactly dequantized operands, accumulated in FP32."""
    b = dequantize_blocks(bq, b_s) if blocks else dequantize_tiles(bq, b_s)
    with torch.autocast(aq.device.type, enabled=False):
        return (dequantize_tiles(aq, a_s) @ b.t()).to(out_dtype)


def _use_cuda(q: torch.Tensor, backend: str) -> bool:
    return backend == "cuda" or (backend == "auto" and q.is_cuda and cuda_blockwise_ok(q.device.index or 0))


def gemm_tiles_blocks(aq, a_s, bq, b_s, out_dtype=torch.float32, backend: str = "auto") -> torch.Tensor:
    """a (1x128 tiles) @ b^T (128x128 blocks): [M, Kp] x [Np, Kp] -> [M, Np] in out_dtype (Fprop, Dgrad)."""
    gemm = _scaled_mm_cuda if _use_cuda(aq, backend) else _emulated
    return gemm(aq, a_s, bq, b_s, out_dtype)


def gemm_tiles_tiles(aq, a_s, bq, b_s, out_dtype=torch.float32, backend: str = "auto") -> torch.Tensor:
    """a @ b^T with both in 1x128 tiles along K: [M, Kp] x [N, Kp] -> [M, N] (Wgrad, K = the tokens)."""
    gemm = _scaled_mm_cuda if _use_cuda(aq, backend) else _emulated
    return gemm(aq, a_s, bq, b_s, out_dtype, blocks=False)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """FP8 GEMMs return BF16 under BF16 autocast (as the report's), else the input's dtype."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        n, k = weight.shape
        x2 = x.reshape(-1, k)
        ctx.shape, ctx.x_dtype, ctx.cuda = x.shape, x.dtype, _use_cuda(x2, "auto")
        if not ctx.cuda:  # emulation: the same numbers from fake-quantized FP32 operands
            xf, wf = fake_tiles(x2), cached_weight(weight, fake_blocks)
            ctx.save_for_backward(xf, wf)
            with torch.autocast(x.device.type, enabled=False):
                return (xf @ wf.t()).to(out_dtype).reshape(*x.shape[:-1], n)
        # rows padded to a multiple of 16 (cuBLASLt; zero rows quantize to zero and add nothing)
        xq, xs = quantize_tiles(_pad(x2, 0, 16))  # [M16, Kp]: cached in FP8 for backward (report §3.3.3)
        wq, ws = cached_weight(weight, quantize_blocks)  # [Np, Kp]
        ctx.save_for_backward(xq, xs, wq, ws)
        return gemm_tiles_blocks(xq, xs, wq, ws, out_dtype)[: x2.shape[0], :n].reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        *lead, k = ctx.shape
        n, m = dy.shape[-1], math.prod(lead)
        dy = dy.reshape(-1, n)
        with torch.autocast(dy.device.type, enabled=False):
            if not ctx.cuda:
                xf, wf = ctx.saved_tensors
                dx = fake_tiles(dy) @ wf  # Dgrad: dy in 1x128 tiles along N, W's blocks
                dw = fake_columns(dy).t() @ fake_columns(xf)  # Wgrad: both in 128x1 tiles along the tokens
                return dx.to(ctx.x_dtype).reshape(*lead, k), dw, None
            xq, xs, wq, ws = ctx.saved_tensors
            dy = _pad(dy, 0, 16)  # [M16, N], as x's rows
            # Dgrad: dx = dy W, dy in 1x128 tiles along N, W's 128x128 blocks read transposed
            dyq, dys = quantize_tiles(dy)
            dx = gemm_tiles_blocks(dyq, dys, wq.t().contiguous(), ws.t().contiguous(), ctx.x_dtype)
            # Wgrad: dW = dy^T x, both operands in 128x1 tiles (along the tokens), FP32 result
            x = dequantize_tiles(xq, xs, k)
            dw = gemm_tiles_tiles(*quantize_tiles(_pad(dy.t(), 0, 16)), *quantize_tiles(_pad(x.t(), 0, 16)))
        return dx[:m, :k].reshape(*lead, k), dw[:n, :k], None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias) with all three GEMMs in E4M3."""
    return _FP8Linear.apply(x, weight, _out_dtype(x))


class FP8Linear(nn.Linear):
    """nn.Linear whose GEMMs run in FP8 (weights stay FP32 masters). Same parameters, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight)


# ------------------------------------------------------------------------------ routed experts (grouped)
def _group_tiles(x: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's 128-row tile index, restarting at every group so no tile spans two experts; and the count."""
    rows = torch.arange(x.shape[0], device=x.device)
    ends = offsets.long()
    group = torch.searchsorted(ends, rows, right=True)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    tiles = (ends - starts + TILE - 1) // TILE  # per group
    first = torch.cat([ends.new_zeros(1), tiles.cumsum(0)[:-1]])
    return first[group] + (rows - starts[group]) // TILE, tiles.sum()


def _grouped(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Grouped product of dequantized FP8 operands, FP32 out. [M, K] x [G, K, N] (or [N, M] x [M, K] for
    Wgrad). On CPU in FP32; on CUDA through the BF16 grouped kernel (PyTorch has no blockwise-FP8 grouped
    GEMM): a dequantized E4M3 value rounded to BF16 moves by at most 2^-9 relative, FP32 accumulation."""
    if a.is_cuda:
        return grouped_mm(a.bfloat16(), b.bfloat16(), offsets).float()
    return grouped_mm(a, b, offsets)


class _FP8GroupedMM(torch.autograd.Function):
    """x [M, K] (rows sorted by group) times w[g]^T for each group g; w: [G, N, K] (master layout)."""

    @staticmethod
    def forward(ctx, x, w, offsets, out_dtype):
        xf, wf = fake_tiles(x), cached_weight(w, fake_blocks)  # [M, K], [G, N, K]
        ctx.save_for_backward(xf, wf, offsets)
        ctx.x_dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return _grouped(xf, wf.transpose(1, 2), offsets).to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        xf, wf, offsets = ctx.saved_tensors
        with torch.autocast(dy.device.type, enabled=False):
            dx = _grouped(fake_tiles(dy), wf, offsets)
            dw = _grouped(fake_columns(dy, offsets).t(), fake_columns(xf, offsets), offsets)  # dW[g] = dy_g^T x_g
        return dx.to(ctx.x_dtype), dw, None, None


def fp8_grouped_mm(x: torch.Tensor, w_t: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Drop-in for moe.grouped_mm(x, w.transpose(1, 2), offsets) with the experts' GEMMs in E4M3."""
    return _FP8GroupedMM.apply(x, w_t.transpose(1, 2), offsets, _out_dtype(x))


# ------------------------------------------------------------------------------------------ conversion
HIGH_PRECISION = ("head",)  # the output head; embedding, gate and norms are not nn.Linear


def convert_to_fp8(model: nn.Module) -> nn.Module:
    """Every linear layer but the output head becomes FP8Linear and routed experts use FP8 grouped GEMMs,
    in place; parameters (and so checkpoints and state dicts) are unchanged."""
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in HIGH_PRECISION:
            module.__class__ = FP8Linear
        elif isinstance(module, Experts):
            module.matmul = fp8_grouped_mm
    return model
