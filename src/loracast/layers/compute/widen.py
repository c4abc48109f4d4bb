"""The first LoRA matmul on an input narrower than the adapter (a bf16 activation, fp32 A),
keeping the narrow input for backward instead of its widened copy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class WidenedLinear(torch.autograd.Function):
    """``F.linear(x.to(weight.dtype), weight)`` where `x` is narrower than `weight` (bf16/fp16
    activations, fp32 adapter), with the gradients autograd gives the plain ops, bit for bit.

    Widening a bf16 or fp16 value to fp32 is exact, so backward widens the saved narrow input
    again and gets the very tensor the plain ops would have kept: the same kernels on the same
    operands (laid out as torch's own linear backward lays them out). What changes is memory:
    the saved input is half the size, and costs nothing when another layer keeps the same
    activation anyway (q, k and v share theirs; so do gate and up).

    Shapes: x (..., in); weight (r, in); output (..., r).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])                            # (N, r)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad2.mm(weight).view(*x.shape[:-1], weight.shape[1]).to(x.dtype)
        if ctx.needs_input_grad[1]:
            wide = x.reshape(-1, x.shape[-1]).to(weight.dtype)             # (N, in), exact
            grad_w = grad2.t().mm(wide)                                     # (r, in)
        return grad_x, grad_w


def widens_exactly(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when `x` is a float narrower than `weight`, so ``x.to(weight.dtype)`` loses nothing."""
    # promotion to the weight's own dtype means the weight's dtype holds every value of x's
    return (x.is_floating_point() and x.dtype != weight.dtype
            and torch.promote_types(x.dtype, weight.dtype) == weight.dtype)
