"""Faster forward/backward for the common LoRA Linear case, in two compute modes.

``"exact"`` (the default) computes what the general path computes, bit for bit: the LoRA
branch in the adapter dtype, added to the base output in the promoted dtype and cast back
once (PEFT's arithmetic). It only removes work whose result is known exactly:

* a scaling of 1 is not multiplied; a scaling of 2**k (k >= 0) is applied to the small
  (tokens, r) tensor before ``lora_B`` instead of the (tokens, out) tensor after it: scaling
  by a power of two commutes with rounding, so every element is identical (barring a
  subnormal or overflowing intermediate);
* with adapters wider than the activations (fp32 adapters on a bf16 base), the sum and the
  cast back are one kernel, and the backward hands the base output its gradient without the
  round trip through fp32 (the widening-then-narrowing copy returns the same bits).
* with adapters wider than the activations and no dropout, the first LoRA matmul keeps the
  narrow input for backward and widens it again there (`loracast.layers.widen`): widening is
  exact, so the gradients are the same bits, and the fp32 copy of every adapted layer's input
  is no longer held from forward to backward.

``"fast"`` computes the LoRA branch in the activation dtype: A and B (tiny) are cast to it
once per forward, and the branch is accumulated into the base output by one matmul-add that
rounds once. Adapter weights, their gradients and optimizer state keep the adapter dtype:
fp32 adapters get fp32 gradients, computed as under ``torch.autocast`` (bf16 matmul with fp32
accumulation, rounded to bf16 once, stored in fp32). What changes is
where the branch is rounded (in bf16 instead of fp32, before the sum instead of after it), so
outputs differ from ``"exact"`` by about one rounding of the activation dtype; the tests state
the tolerance. On a plain `nn.Linear` base (no hooks, frozen weight) the base matmul runs in
the same fused function, and in backward the LoRA input gradient is accumulated into the
base's with one matmul-add.

Both modes cover one active adapter, no ``lora_bias``, no per-sample adapter names, no
autocast; everything else runs the general path in `LoraLayer.forward`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loracast.layers.routing import routed_adapter_names
from loracast.layers.widen import WidenedLinear, widens_exactly
from loracast.precision.rules import autocast_active
from loracast.quant.base import foreign_tensor

LORA_COMPUTE_MODES: tuple[str, ...] = ("exact", "fast")


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


def _no_hooks(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


def plain_factor(module: nn.Module) -> bool:
    """True for a LoRA factor whose weight the fast paths may read directly: a plain `nn.Linear`
    without hooks. A wrapper (an FSDP1 unit) materialises the weight only inside its own forward."""
    return type(module) is nn.Linear and _no_hooks(module)


def global_hooks() -> bool:
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


def _plain_linear_base(base: nn.Module) -> bool:
    """True when calling ``F.linear`` ourselves gives exactly what calling `base` gives."""
    if type(base) is not nn.Linear or not _no_hooks(base):
        return False
    if foreign_tensor(base.weight):  # a quantized weight (torchao): its backward has no in-place matmul-add
        return False
    return not (base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad))


def single_adapter(layer: Any, x: torch.Tensor) -> str | None:
    """The one active adapter when the fast paths apply to this call, else None.

    They apply to a float input of 2+ dims, one active plain LoRA adapter (no ``lora_bias``, no
    variant such as DoRA), no per-sample adapter names, nothing merged or disabled, no autocast,
    and adapter factors that are plain `nn.Linear` modules without hooks (others are called as
    modules by the general path).
    """
    if layer._disable_adapters or layer.merged_adapters or routed_adapter_names() is not None:
        return None
    active = layer._active_adapters
    if len(active) != 1 or not x.is_floating_point() or x.dim() < 2:
        return None
    name = active[0]
    if layer.lora_bias.get(name) or not layer.lora_variant[name].plain or autocast_active(x.device.type) \
            or global_hooks():
        return None
    if not (plain_factor(layer.lora_A[name]) and plain_factor(layer.lora_B[name])):
        return None
    return name


def _needs_graph(*tensors: torch.Tensor | None) -> bool:
    """True when autograd will record this computation (else the plain ops run, without a Function)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def exact_forward(layer: Any, x: torch.Tensor, name: str, result: torch.Tensor | None = None) -> torch.Tensor:
    """The general path's result, bit for bit, with less work (see the module docstring).

    `result` is the base layer's output when the caller already has it.
    """
    weight_a, weight_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    scaling = layer.scaling[name]
    if result is None:
        result = layer.base_layer(x)
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, nn.Identity) and widens_exactly(x, weight_a) and _needs_graph(x, weight_a):
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
    if _needs_graph(result, y):
        return AddCast.apply(result, y)
    return torch.add(result, y, out=torch.empty_like(result))


def fast_forward(layer: Any, x: torch.Tensor, name: str) -> torch.Tensor:
    """The LoRA branch in the activation dtype, fused with the base where it is a plain Linear.

    Where the base output's dtype is not the activation dtype (a base that casts), the
    "exact" computation runs instead.
    """
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    scaling = layer.scaling[name]
    base = layer.base_layer
    fused = not layer.fan_in_fan_out and _plain_linear_base(base) and base.weight.dtype == x.dtype
    result = None if fused else base(x)
    if result is not None and result.dtype != x.dtype:
        return exact_forward(layer, x, name, result)
    dropout = layer.lora_dropout[name]
    x_lora = x if isinstance(dropout, nn.Identity) or not dropout.training else dropout(x)
    graph = _needs_graph(x, x_lora, lora_a, lora_b, result)
    if fused:
        if graph:
            return FusedLinearLora.apply(x, x_lora, base.weight, base.bias, lora_a, lora_b, scaling)
        return fused_linear_lora(x, x_lora, base.weight, base.bias, lora_a, lora_b, scaling)[0]
    if graph:
        return FastLoraBranch.apply(x_lora, result, lora_a, lora_b, scaling)
    return fast_lora_branch(x_lora, result, lora_a, lora_b, scaling)[0]
