"""LoRA over `nn.Conv1d`, `nn.Conv2d` and `nn.Conv3d`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loracast.errors import LoracastError
from loracast.layers import dora
from loracast.layers.base import LoraLayer, delta_dtype
from loracast.layers.init import init_factor_pair, rounding_dtype
from loracast.precision.rules import cast_for_adapter


class Conv(LoraLayer):
    """``y = base(x) + B(A(dropout(x))) * scaling`` for a convolution.

    lora_A is a convolution like the base (same kernel, stride, padding, dilation) into `r`
    channels; lora_B a 1x...x1 convolution from `r` to the output channels, so the update is
    ``delta[o, i, ...] = scaling * sum_k B[o, k] * A[k, i, ...]``.
    """

    def __init__(self, base_layer: nn.modules.conv._ConvNd) -> None:
        super().__init__(base_layer)
        self.in_features = base_layer.in_channels
        self.out_features = base_layer.out_channels
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def update_layer(self, adapter_name, r, lora_alpha, *, lora_dropout, init_lora_weights, use_rslora,
                     lora_bias, dtype, device):
        base = self.base_layer
        if r % base.groups:
            raise LoracastError(f"rank {r} is not divisible by the groups={base.groups} of the targeted "
                                f"{type(base).__name__}; choose r as a multiple of {base.groups} or exclude the layer")
        self._register_numbers(adapter_name, r, lora_alpha, use_rslora, lora_bias, lora_dropout)
        conv_type = type(base)
        ones = (1,) * (base.weight.dim() - 2)
        # built on the meta device (no draws), then filled with PEFT's random draws (layers/init.py)
        lora_a = conv_type(self.in_features, r, base.kernel_size, base.stride, base.padding,
                           dilation=base.dilation, bias=False, device="meta", dtype=dtype).to_empty(device=device)
        lora_b = conv_type(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias,
                           device="meta", dtype=dtype).to_empty(device=device)
        self.lora_A[adapter_name] = lora_a
        self.lora_B[adapter_name] = lora_b
        init_factor_pair(lora_a.weight, lora_b.weight, lora_b.bias, init_lora_weights, r, rounding_dtype(base))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        base = self.base_layer
        if base.groups > 1:
            raise LoracastError(f"cannot merge into a {type(base).__name__} with groups={base.groups}: its weight "
                                "holds only the in-group connections the LoRA update spans; keep the adapter unmerged")
        weight_a = self.lora_A[adapter_name].weight  # (r, in, *kernel)
        weight_b = self.lora_B[adapter_name].weight  # (out, r, 1, ...)
        dtype = delta_dtype(weight_a)
        delta = weight_b.to(dtype).flatten(1) @ weight_a.to(dtype).flatten(1)  # (out, in * prod(kernel))
        return delta.view(base.weight.shape) * self.scaling[adapter_name]

    # DoRA: one magnitude per output channel, shaped (1, out, 1, ...) as PEFT's.

    def add_dora(self, adapter_name: str, *, dtype: torch.dtype, device: torch.device, initialize: bool) -> None:
        base = self.base_layer
        if base.groups > 1:
            raise LoracastError(f"use_dora=True cannot adapt a {type(base).__name__} with groups={base.groups}: "
                                "its weight holds only the in-group connections the update spans; exclude the layer "
                                "from target_modules or set use_dora=False")
        super().add_dora(adapter_name, dtype=dtype, device=device, initialize=initialize)

    def _dora_weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)

    def _dora_magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.out_features) + (1,) * (self.base_layer.weight.dim() - 2)

    def _dora_forward(self, x: torch.Tensor, adapter_name: str, result: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        channel_view = (1, -1) + (1,) * (result.dim() - 2)
        lora_a, lora_b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        x = cast_for_adapter(x, lora_a.weight.dtype)
        dropout = self.lora_dropout[adapter_name]
        factor = dora.scale(self, adapter_name).view(channel_view)
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = None if base.bias is None else base.bias.view(channel_view)
            return dora.combine(result, lora_b(lora_a(x)), factor, self.scaling[adapter_name], bias)
        # PEFT's semantics with dropout: the rescaled base part W x sees the dropped-out input too
        x = dropout(x)
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[base.weight.dim()]
        base_result = conv(x, base.weight.to(x.dtype), None, base.stride, base.padding, base.dilation, base.groups)
        return result + (factor - 1) * base_result + factor * lora_b(lora_a(x)) * self.scaling[adapter_name]
