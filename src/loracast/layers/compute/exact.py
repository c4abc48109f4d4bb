"""The "exact" compute mode: what `LoraLayer.forward` computes, bit for bit, with less work.

The LoRA branch runs in the adapter dtype, is added to the base output in the promoted dtype and
cast back once (PEFT's arithmetic). Only work whose result is known exactly is removed:

* a scaling of 1 is not multiplied; a scaling of 2**k (k >= 0) is applied to the small
  (tokens, r) tensor before ``lora_B`` instead of the (tokens, out) tensor after it: scaling
  by a power of two commutes with rounding, so every element is identical (barring a
  subnormal or overflowing intermediate);
* with adapters wider than the activations (fp32 adapters on a bf16 base), the sum and the
  cast back are one kernel, and the backward hands the base output its gradient without the
  round trip through fp32 (the widening-then-narrowing copy returns the same bits).
* with adapters wider than the activations and no dropout, the first LoRA matmul keeps the
  narrow input for backward and widens it again there (`loracast.layers.compute.widen`):
  widening is exact, so the gradients are the same bits, and the fp32 copy of every adapted
  layer's input is no longer held from forward to backward.

When it applies is decided in `loracast.layers.compute.dispatch`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loracast.layers.compute.layer import ComputeLayer
from loracast.layers.compute.widen import WidenedLinear, widens_exactly


def is_exact_power_of_two(value: float) -> bool:
    """True for 2**k with k >= 0 (1, 2, 4, ...): multiplying by it never rounds."""
    if not (value >= 1.0 and math.isfinite(value)):
        return False
    mantissa, _ = math.frexp(value)
    return mantissa == 0.5


class AddCast(torch.autograd.Function):
    """``(result + y).to(result.dtype)`` as one kernel, where `y` is wider than `result`.

    The sum is computed in the promoted dtype and rounded once into a tensor of `result`'s
    dtype, exactly as the two separate ops do. Backward: `result` gets the incoming gradient
    itself (widening then narrowing it gives the same bits back), `y` gets it widened.
    """

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.y_dtype = y.dtype
        out = torch.empty_like(result)
        torch.add(result, y, out=out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        grad_result = grad if ctx.needs_input_grad[0] else None
        grad_y = grad.to(ctx.y_dtype) if ctx.needs_input_grad[1] else None
        return grad_result, grad_y


def needs_graph(*tensors: torch.Tensor | None) -> bool:
    """True when autograd will record this computation (else the plain ops run, without a Function)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def exact_forward(layer: ComputeLayer, x: torch.Tensor, name: str, result: torch.Tensor | None = None) -> torch.Tensor:
    """The general path's result, bit for bit, with less work (see the module docstring).

    `result` is the base layer's output when the caller already has it.
    """
    weight_a, weight_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    scaling = layer.scaling[name]
    if result is None:
        result = layer.base_layer(x)
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, nn.Identity) and widens_exactly(x, weight_a) and needs_graph(x, weight_a):
        h = WidenedLinear.apply(x, weight_a)  # (..., r); keeps x, not its fp32 copy, for backward
    else:
        x_a = x if x.dtype == weight_a.dtype else x.to(weight_a.dtype)
        h = F.linear(x_a if isinstance(dropout, nn.Identity) else dropout(x_a), weight_a)  # (..., r)
    if scaling == 1.0:
        y = F.linear(h, weight_b)
    elif is_exact_power_of_two(scaling):
        y = F.linear(h * scaling, weight_b)                              # scale the small tensor
    else:
        y = F.linear(h, weight_b).mul_(scaling)
    if y.dtype == result.dtype:
        return result + y
    if torch.promote_types(result.dtype, y.dtype) != y.dtype:
        return (result + y).to(result.dtype)
    if needs_graph(result, y):
        return AddCast.apply(result, y)
    return torch.add(result, y, out=torch.empty_like(result))
