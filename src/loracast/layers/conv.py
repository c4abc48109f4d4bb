"""LoRA over `nn.Conv1d`, `nn.Conv2d` and `nn.Conv3d`."""

from __future__ import annotations

import torch
from torch import nn

from loracast.errors import LoracastError
from loracast.layers.base import LoraLayer, delta_dtype
from loracast.layers.init.random_init import init_factor_pair, rounding_dtype


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
        # built on the meta device (no draws), then filled with PEFT's random draws (layers/init/random_init.py)
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
            raise LoracastError(f"cannot merge into a {type(base).__name__} with groups={base.groups}: the LoRA update "
                                "connects every input channel to every output channel, and the grouped weight holds "
                                "only the in-group connections (PEFT refuses this merge too); keep the adapter "
                                "unmerged, or adapt an ungrouped layer")
        weight_a = self.lora_A[adapter_name].weight  # (r, in, *kernel)
        weight_b = self.lora_B[adapter_name].weight  # (out, r, 1, ...)
        dtype = delta_dtype(weight_a)
        delta = weight_b.to(dtype).flatten(1) @ weight_a.to(dtype).flatten(1)  # (out, in * prod(kernel))
        return delta.view(base.weight.shape) * self.scaling[adapter_name]
