"""Initial adapter values, drawn from torch's random stream exactly as PEFT draws them.

A training script switched from PEFT must see the same initial `lora_A` for the same seed, or
its losses differ from the first step. PEFT builds each factor with its torch constructor
(``nn.Linear`` / ``nn.ConvNd`` draw a kaiming-uniform weight and a uniform bias; an Embedding
adapter draws ``randn`` for both), then redraws `lora_A` in ``reset_lora_parameters``. Every
draw happens on the CPU in float32, before the values are moved to the base layer's device and
cast to the base layer's float dtype (so a float32 adapter on a bfloat16 base starts from
bf16-rounded values, upcast afterwards). The functions here make the same draws, in the same order, with the
same shapes, and copy the kept values into the adapter's tensors; the discarded draws are
made only so that the stream advances as PEFT's does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loracast.layers.build import kaiming_bound
from loracast.precision.rules import base_weight


def rounding_dtype(base_layer: nn.Module) -> torch.dtype | None:
    """The dtype PEFT rounds fresh adapter values to before its fp32 upcast: a quantized layer's
    declared ``compute_dtype``, else the base weight's dtype; None when that is not floating."""
    weight = base_weight(base_layer)
    dtype = weight.dtype if weight is not None else None
    if hasattr(base_layer, "compute_dtype"):  # bitsandbytes 4-bit
        dtype = base_layer.compute_dtype
    return dtype if dtype is not None and dtype.is_floating_point else None


def _kaiming(shape: torch.Size) -> torch.Tensor:
    """What ``nn.Linear(...)`` / ``nn.ConvNd(...)`` draw for a weight (kaiming uniform, a=sqrt(5))."""
    fan_in = math.prod(shape[1:])
    bound = kaiming_bound(fan_in)
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound)


def _bias(size: int, fan_in: int) -> torch.Tensor:
    """What ``nn.Linear(...)`` / ``nn.ConvNd(...)`` draw for a bias."""
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return torch.empty(size, dtype=torch.float32).uniform_(-bound, bound)


def _fill(target: torch.Tensor, values: torch.Tensor, through: torch.dtype | None) -> None:
    with torch.no_grad():
        target.copy_(values if through is None else values.to(through))


def init_factor_pair(weight_a: torch.Tensor, weight_b: torch.Tensor, bias_b: torch.Tensor | None,
                     init_lora_weights: bool | str | None, r: int, through: torch.dtype | None) -> None:
    """Fill a Linear or convolution adapter's factors as PEFT does for the same random state.

    `init_lora_weights`: True (A kaiming uniform, B zero), "gaussian" (A normal with std 1/r,
    B zero), False (both factors keep their constructors' random values) or None (left as they
    are: a checkpoint is about to be loaded, and PEFT draws nothing either). Values are rounded
    to `through` (`rounding_dtype` of the base layer) before they are stored. Nothing is drawn
    on the meta device.
    """
    if init_lora_weights is None or weight_a.device.type == "meta":
        return
    values_a = _kaiming(weight_a.shape)  # nn.Linear(in, r) / ConvNd(in, r, k)
    values_b = _kaiming(weight_b.shape)  # nn.Linear(r, out) / ConvNd(r, out, 1)
    values_bias = _bias(weight_b.shape[0], math.prod(weight_b.shape[1:])) if bias_b is not None else None
    if init_lora_weights is not False:  # PEFT's reset_lora_parameters redraws A and zeroes B
        if init_lora_weights == "gaussian":
            values_a = torch.empty(weight_a.shape, dtype=torch.float32).normal_(std=1 / r)
        else:
            values_a = _kaiming(weight_a.shape)
        values_b = torch.zeros(weight_b.shape, dtype=torch.float32)
        values_bias = torch.zeros_like(values_bias) if values_bias is not None else None
    _fill(weight_a, values_a, through)
    _fill(weight_b, values_b, through)
    if bias_b is not None:
        _fill(bias_b, values_bias, through)


def init_embedding_pair(weight_a: torch.Tensor, weight_b: torch.Tensor, init_lora_weights: bool | str | None,
                        through: torch.dtype | None) -> None:
    """Fill an Embedding adapter's factors as PEFT does: both drawn with ``randn``; unless
    `init_lora_weights` is False, A is then zeroed and B drawn again (normal, nn.Embedding's
    own init), so the adapter starts as a no-op. Values are rounded to `through` as above."""
    if init_lora_weights is None or weight_a.device.type == "meta":
        return
    values_a = torch.randn(weight_a.shape, dtype=torch.float32)
    values_b = torch.randn(weight_b.shape, dtype=torch.float32)
    if init_lora_weights is not False:
        values_a = torch.zeros(weight_a.shape, dtype=torch.float32)
        values_b = torch.empty(weight_b.shape, dtype=torch.float32).normal_()
    _fill(weight_a, values_a, through)
    _fill(weight_b, values_b, through)
