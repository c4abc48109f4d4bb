"""The "fast" compute mode: the LoRA branch in the activation dtype.

A and B (tiny) are cast to the activation dtype once per forward, and the branch is accumulated
into the base output by one matmul-add that rounds once. Adapter weights, their gradients and
optimizer state keep the adapter dtype: fp32 adapters get fp32 gradients, computed as under
``torch.autocast`` (bf16 matmul with fp32 accumulation, rounded to bf16 once, stored in fp32).
What changes is where the branch is rounded (in bf16 instead of fp32, before the sum instead of
after it), so outputs differ from ``"exact"`` by about one rounding of the activation dtype; the
tests state the tolerance. On a plain `nn.Linear` base (no hooks, frozen weight) the base matmul
runs in the same fused function, and in backward the LoRA input gradient is accumulated into the
base's with one matmul-add.

When it applies is decided in `loracast.layers.compute.dispatch`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loracast.layers.compute.direct import plain_linear_base
from loracast.layers.compute.exact import exact_forward, needs_graph
from loracast.layers.compute.layer import ComputeLayer


def _weight_grad(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``left @ right`` in the activation dtype, returned in the adapter's `dtype`.

    As under ``torch.autocast``: the matmul multiplies bf16 values exactly and accumulates in
    fp32, and its result is rounded to bf16 once before it is stored into an fp32 gradient.
    (Keeping the fp32 sum instead needs fp32 operands; on CPUs where fp32 matmuls run at a
    quarter of bf16's speed that costs several percent of a training step.)
    """
    return torch.mm(left, right).to(dtype)


def fused_linear_lora(x: torch.Tensor, x_lora: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float):
    """`FusedLinearLora`'s forward computation: (output, x and x_lora flattened, h, A and B cast)."""
    x2 = x.reshape(-1, x.shape[-1])                                      # (N, in)
    xl2 = x2 if x_lora is x else x_lora.reshape(-1, x_lora.shape[-1])
    a_c, b_c = lora_a.to(x.dtype), lora_b.to(x.dtype)                    # (r, in), (out, r)
    h = torch.mm(xl2, a_c.t())                                           # (N, r)
    out = F.linear(x2, weight, bias)                                     # the base layer's own result
    out.addmm_(h, b_c.t(), alpha=scaling)                                # out += s * h @ B.T, one rounding
    return out.view(*x.shape[:-1], out.shape[-1]), x2, xl2, h, a_c, b_c


class FusedLinearLora(torch.autograd.Function):
    """``F.linear(x, W, b) + scaling * (x_lora @ A.T) @ B.T`` for a frozen `nn.Linear` base,
    the LoRA branch in the activation dtype, accumulated by one matmul-add.

    Shapes: x, x_lora (..., in); W (out, in); A (r, in); B (out, r). `x_lora` is `x` itself
    unless dropout is active. Gradients: x and x_lora in the activation dtype; A and B in
    their own dtype (see `_weight_grad`).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, x_lora: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float) -> torch.Tensor:
        out, x2, xl2, h, a_c, b_c = fused_linear_lora(x, x_lora, weight, bias, lora_a, lora_b, scaling)
        ctx.shared = xl2 is x2
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(xl2, h, weight, a_c, b_c)  # the base is frozen: its input is not needed
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        xl2, h, weight, a_c, b_c = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])                             # (N, out)
        need_x, need_xl = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_a, need_b = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        grad_x = grad_xl = grad_a = grad_b = None
        grad_h = None
        if need_a or need_x or need_xl:
            grad_h = torch.mm(g2, b_c).mul_(ctx.scaling)                  # (N, r)
        if ctx.shared:
            if need_x:
                grad_x = torch.mm(grad_h, a_c).addmm_(g2, weight)          # lora + base, one rounding
                grad_x = grad_x.view(ctx.x_shape)
        else:
            if need_x:
                grad_x = torch.mm(g2, weight).view(ctx.x_shape)
            if need_xl:
                grad_xl = torch.mm(grad_h, a_c).view(ctx.x_shape)
        if need_a:
            grad_a = _weight_grad(grad_h.t(), xl2, ctx.dtypes[0])         # (r, in)
        if need_b:
            grad_b = _weight_grad(g2.t(), h, ctx.dtypes[1]).mul_(ctx.scaling)  # (out, r)
        return grad_x, grad_xl, None, None, grad_a, grad_b, None


def fast_lora_branch(x_lora: torch.Tensor, result: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                     scaling: float):
    """`FastLoraBranch`'s forward computation: (output, x_lora flattened, h, A and B cast)."""
    xl2 = x_lora.reshape(-1, x_lora.shape[-1])
    a_c, b_c = lora_a.to(x_lora.dtype), lora_b.to(x_lora.dtype)
    h = torch.mm(xl2, a_c.t())
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h, b_c.t(), alpha=scaling)
    return out.view(result.shape), xl2, h, a_c, b_c


class FastLoraBranch(torch.autograd.Function):
    """``result + scaling * (x_lora @ A.T) @ B.T`` for any base, the branch in the activation
    dtype; `result` is the base layer's output (same dtype as `x_lora`), left untouched."""

    @staticmethod
    def forward(ctx: Any, x_lora: torch.Tensor, result: torch.Tensor, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        out, xl2, h, a_c, b_c = fast_lora_branch(x_lora, result, lora_a, lora_b, scaling)
        ctx.scaling = scaling
        ctx.x_shape = x_lora.shape
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(xl2, h, a_c, b_c)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        xl2, h, a_c, b_c = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        need_xl, need_result, need_a, need_b = ctx.needs_input_grad[:4]
        grad_xl = grad_a = grad_b = None
        if need_xl or need_a:
            grad_h = torch.mm(g2, b_c).mul_(ctx.scaling)
            if need_xl:
                grad_xl = torch.mm(grad_h, a_c).view(ctx.x_shape)
            if need_a:
                grad_a = _weight_grad(grad_h.t(), xl2, ctx.dtypes[0])
        if need_b:
            grad_b = _weight_grad(g2.t(), h, ctx.dtypes[1]).mul_(ctx.scaling)
        return grad_xl, (grad if need_result else None), grad_a, grad_b, None


def fast_forward(layer: ComputeLayer, x: torch.Tensor, name: str) -> torch.Tensor:
    """The LoRA branch in the activation dtype, fused with the base where it is a plain Linear.

    Where the base output's dtype is not the activation dtype (a base that casts), the
    "exact" computation runs instead.
    """
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    scaling = layer.scaling[name]
    base = layer.base_layer
    fused = not layer.fan_in_fan_out and plain_linear_base(base) and base.weight.dtype == x.dtype
    result = None if fused else base(x)
    if result is not None and result.dtype != x.dtype:
        return exact_forward(layer, x, name, result)
    dropout = layer.lora_dropout[name]
    x_lora = x if isinstance(dropout, nn.Identity) or not dropout.training else dropout(x)
    graph = needs_graph(x, x_lora, lora_a, lora_b, result)
    if fused:
        if graph:
            return FusedLinearLora.apply(x, x_lora, base.weight, base.bias, lora_a, lora_b, scaling)
        return fused_linear_lora(x, x_lora, base.weight, base.bias, lora_a, lora_b, scaling)[0]
    if graph:
        return FastLoraBranch.apply(x_lora, result, lora_a, lora_b, scaling)
    return fast_lora_branch(x_lora, result, lora_a, lora_b, scaling)[0]
