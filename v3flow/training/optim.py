"""AdamW with its moments stored in BF16 (report §3.3.4), parameters and gradients in FP32.

The update is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments), computed in FP32 from
the stored moments; only the two moment buffers are kept in `moment_dtype`, halving the optimizer's
memory. With moment_dtype float32 it is torch's AdamW step for step.
"""

from __future__ import annotations

import math

import torch


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 moment_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.moment_dtype = moment_dtype

    def _state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
        for key in ("exp_avg", "exp_avg_sq"):  # Optimizer.load_state_dict casts state to the parameter dtype
            if st[key].dtype != self.moment_dtype:
                st[key] = st[key].to(self.moment_dtype)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._state(p)
                st["step"] = st["step"] + 1  # a new tensor: a loaded state dict may share the old one
                t = float(st["step"])
                g = p.grad.float()
                m = st["exp_avg"].float().lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * wd)
                denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1**t))
