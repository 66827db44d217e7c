"""DeepSeekMoE with auxiliary-loss-free load balancing (report §2.1.2, eqs 12-20).

    s_i   = sigmoid(u . e_i)                                   affinities, in fp32 (gating stays out of FP8)
    pick  = top-K_r of s_i + b_i, within the top-M groups      b_i: per-expert bias, used for selection only
    g_i   = s_i / sum_{selected} s_j * routed_scaling_factor   the bias never enters the gate value
    h'    = u + sum shared FFN(u) + sum_i g_i FFN_i(u)         (the residual lives in the Block)

Group limiting: experts are split into n_expert_groups groups; a group's score is the sum of its two
highest s + b; a token may only use experts of its n_limited_groups best groups (the analogue of the
report's at-most-4-nodes routing).

Dispatch: the (token, expert) pairs are sorted by expert and each expert's slice goes through one grouped
matrix product (`torch._grouped_mm`), with no Python loop over tokens and no dense all-experts compute.

Balancing: `loads` counts tokens per expert since the last `update_bias`; after each optimizer step the
trainer calls `update_bias(gamma)`, which lowers the bias of overloaded experts and raises that of
underloaded ones by gamma (outside autograd). `balance_loss` is the complementary sequence-wise loss
sum_i f_i P_i of the last forward pass (the trainer weights it by alpha).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from v3flow.model.args import ModelConfig
from v3flow.model.layers import MLP, upcast


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))  # centroids e_i
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))  # b_i

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, dim] -> gate values [N, K_r], expert indices [N, K_r], affinities s [N, N_r] (fp32)."""
        cfg = self.cfg
        xf = upcast(x)
        with torch.autocast(x.device.type, enabled=False):  # autocast would recast the affinities to BF16
            scores = F.linear(xf, self.weight.to(xf.dtype)).sigmoid()
        choice = scores + self.bias.to(xf.dtype)
        if cfg.n_expert_groups > 1:
            groups = choice.view(x.shape[0], cfg.n_expert_groups, -1)  # [N, G, N_r / G]
            top_groups = groups.topk(2, dim=-1).values.sum(-1).topk(cfg.n_limited_groups, dim=-1).indices
            keep = torch.zeros(groups.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, top_groups, True)
            choice = groups.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        indices = choice.topk(cfg.n_activated_experts, dim=-1).indices
        gates = scores.gather(1, indices)
        gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20) * cfg.route_scale
        return gates.type_as(x), indices, scores


def _kernel_runs(*tensors: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands: a supported dtype, and every stride but the unit one
    (and the start) 16-byte aligned, which e.g. dim or moe_inter_dim not a multiple of 4 (FP32) breaks."""
    kernel_dtypes = (torch.float32, torch.bfloat16, torch.float16) if tensors[0].is_cpu else (torch.bfloat16,)
    return hasattr(torch, "_grouped_mm") and all(
        t.dtype in kernel_dtypes and t.data_ptr() % 16 == 0
        and all(step * t.element_size() % 16 == 0 for step in t.stride() if step != 1) for t in tensors)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x, sorted by group, times that group's matrix: x [M, K] @ w [G, K, N] -> [M, N]; or, for a
    weight gradient, x [N, M] @ w [M, K] with the groups along M -> [G, N, K]. offsets: [G] group ends."""
    if torch.is_autocast_enabled(x.device.type):  # like F.linear: compute in the autocast dtype
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    if _kernel_runs(x, w):
        return torch._grouped_mm(x, w, offs=offsets)
    ends = offsets.tolist()  # a loop over the groups where the kernel does not run
    starts = [0] + ends[:-1]
    if w.ndim == 2:
        return torch.stack([x[:, s:e] @ w[s:e] for s, e in zip(starts, ends)])
    return torch.cat([x[s:e] @ w[g] for g, (s, e) in enumerate(zip(starts, ends))])


class Experts(nn.Module):
    """The N_r routed SwiGLU experts, stored stacked: w1, w3 [N_r, inter, dim] and w2 [N_r, dim, inter].
    `matmul` is the grouped product; FP8 conversion (fp8.py) swaps it for its E4M3 version."""

    matmul = staticmethod(grouped_mm)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, d, i = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.w1 = nn.Parameter(torch.empty(e, i, d))  # gate_proj
        self.w3 = nn.Parameter(torch.empty(e, i, d))  # up_proj
        self.w2 = nn.Parameter(torch.empty(e, d, i))  # down_proj

    def forward(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, counts: torch.Tensor):
        """x: [N, dim]; indices, gates: [N, K_r]; counts: tokens per expert [N_r]. Returns [N, dim]."""
        k = indices.shape[1]
        order = indices.flatten().argsort(stable=True)  # (token, slot) pairs sorted by expert
        token = order // k
        offsets = counts.cumsum(0).to(torch.int32)
        xs = x.index_select(0, token)  # [N * K_r, dim]; backward: index_add (x[token]: not reproducible, CPU threads)
        h = F.silu(self.matmul(xs, self.w1.transpose(1, 2), offsets)) * self.matmul(xs, self.w3.transpose(1, 2), offsets)
        y = self.matmul(h, self.w2.transpose(1, 2), offsets) * gates.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, y.type_as(x))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        self.register_buffer("loads", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.balance_loss: torch.Tensor | None = None
        self.recomputing = False  # set while activation checkpointing replays this layer in the backward pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, dim] -> [B, T, dim]."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        gates, indices, scores = self.gate(flat)
        counts = torch.bincount(indices.flatten(), minlength=self.cfg.n_routed_experts)
        out = self.experts(flat, indices, gates, counts)
        if self.shared is not None:
            out = out + self.shared(flat)
        self.balance_loss = None  # only a training pass has one: an eval pass must not add a stale one
        if self.training:
            if not self.recomputing:  # a forward replayed by activation checkpointing must not count twice
                self.loads += counts.to(self.loads.dtype)
            self.balance_loss = self.sequence_balance_loss(indices.view(B, T, -1), scores.view(B, T, -1))
        return out.view(B, T, D)

    def sequence_balance_loss(self, indices: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """sum_i f_i P_i per sequence (report eqs 17-20), averaged over the batch; alpha is applied outside.

        f_i = N_r / (K_r T) * (tokens of the sequence routed to i), P_i = mean_t s_i / sum_j s_j.
        """
        cfg = self.cfg
        B, T, K = indices.shape
        hits = torch.zeros(B, cfg.n_routed_experts, device=indices.device)
        hits.scatter_add_(1, indices.reshape(B, -1), torch.ones(B, T * K, device=indices.device))
        f = hits * cfg.n_routed_experts / (K * T)
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, N_r]
        return (f * p).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float) -> torch.Tensor:
        """b_i += gamma * sign(mean load - load_i); returns the loads used and resets them.

        With data parallelism, all-reduce `loads` before calling this so every rank sees the global batch.
        """
        loads = self.loads.clone()
        bias_update(self.gate.bias, loads, gamma)
        self.loads.zero_()
        return loads


@torch.no_grad()
def bias_update(bias: torch.Tensor, loads: torch.Tensor, gamma: float) -> None:
    """b_i += gamma * sign(mean load - load_i) in place (report §2.1.2), for any router's bias: ours, or
    transformers' `e_score_correction_bias` while TRL trains (v3flow/training/posttrain.py)."""
    loads = loads.float()
    if gamma and loads.sum() > 0:
        bias += gamma * torch.sign(loads.mean() - loads).to(bias.dtype)


def max_violation(loads: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean load - 1 (the balancing paper's metric); 0 is perfect balance."""
    mean = loads.float().mean()
    return float(loads.max() / mean - 1) if mean > 0 else 0.0
