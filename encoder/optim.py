"""Adam with per-field learning rates and a clamp into the valid ranges, as one step.

On CUDA the step is one fused Triton kernel (moments, update, clamp, and
zeroing the gradient for the next accumulation); elsewhere it is a handful of
tensor ops. The fit loop runs thousands of steps per image, so the launch
count per step matters.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs no Triton
    triton = None


if triton is not None:

    @triton.jit
    def _adam_kernel(P, G, M, V, LR, LO, HI, n, b1, b2, bias1, bias2, eps, scale, FIELDS: tl.constexpr,
                     BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        field = offs % FIELDS
        g = tl.load(G + offs, mask=mask, other=0.0)
        m = tl.load(M + offs, mask=mask, other=0.0) * b1 + (1.0 - b1) * g
        v = tl.load(V + offs, mask=mask, other=0.0) * b2 + (1.0 - b2) * g * g
        lr = tl.load(LR + field, mask=mask, other=0.0) * scale
        p = tl.load(P + offs, mask=mask, other=0.0) - lr * (m / bias1) / (tl.sqrt(v / bias2) + eps)
        p = tl.minimum(tl.maximum(p, tl.load(LO + field, mask=mask, other=0.0)), tl.load(HI + field, mask=mask, other=0.0))
        tl.store(P + offs, p, mask=mask)
        tl.store(M + offs, m, mask=mask)
        tl.store(V + offs, v, mask=mask)
        tl.store(G + offs, tl.zeros_like(g), mask=mask)


class Adam:
    """Adam over one ``[..., F]`` tensor with a learning rate and bounds per field (last axis)."""

    def __init__(self, params: torch.Tensor, lr: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 betas: tuple[float, float], eps: float = 1e-8, fused: bool | None = None):
        self.params, self.lr, self.lo, self.hi = params, lr, lo, hi
        self.betas, self.eps = betas, eps
        self.m = torch.zeros_like(params)
        self.v = torch.zeros_like(params)
        self.t = 0
        self.fused = (params.is_cuda and triton is not None) if fused is None else fused

    def step(self, grad: torch.Tensor, lr_factor: float = 1.0) -> None:
        """Update and clamp the parameters in place, then zero ``grad`` for the next accumulation.

        ``lr_factor`` scales every learning rate for this step (a schedule). It is
        a plain number, not a tensor, so a CUDA graph capture bakes each step's
        value into that step's launch at no cost.
        """
        b1, b2 = self.betas
        self.t += 1
        bias1, bias2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        if self.fused:
            n = self.params.numel()
            block = 1024
            _adam_kernel[(triton.cdiv(n, block),)](
                self.params, grad, self.m, self.v, self.lr, self.lo, self.hi, n, b1, b2, bias1, bias2, self.eps, lr_factor,
                FIELDS=self.params.shape[-1], BLOCK=block,
            )
            return
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v / bias2).sqrt_().add_(self.eps)
        self.params.addcdiv_(self.m * (self.lr * (lr_factor / bias1)), denom, value=-1.0)
        torch.clamp(self.params, self.lo, self.hi, out=self.params)
        grad.zero_()
