"""LoRA over `nn.Linear` and transformers' GPT-2 `Conv1D` (weight stored as (in, out))."""

from __future__ import annotations

import torch
from torch import nn

from loracast.errors import ConfigError, LoracastError
from loracast.layers import build
from loracast.layers.base import LoraLayer, delta_dtype
from loracast.layers.fastpath import exact_forward, fast_forward, single_adapter
from loracast.layers.init.from_base import decompose, orthogonal_factors, residual
from loracast.layers.init.random_init import init_factor_pair, rounding_dtype
from loracast.precision.rules import base_weight
from loracast.quant import find_backend
from loracast.quant import merge as quant_merge
from loracast.quant.loftq import loftq


class Linear(LoraLayer):
    """``y = base(x) + B(A(dropout(x))) * scaling`` for a linear base layer.

    Shapes: x (..., in_features); lora_A.weight (r, in_features); lora_B.weight (out_features, r).
    `fan_in_fan_out` is True for bases that store their weight as (in, out), like GPT-2's Conv1D;
    it only changes the layout of `get_delta_weight`.

    A quantized base (any layer a `QuantBackend` claims, e.g. bitsandbytes 4-bit/8-bit) runs the
    same forward; merging goes through the backend: dequantize, add the exact delta, requantize,
    and unmerge puts the backend's snapshot of the original quantized weight back.

    `lora_compute` picks how forward computes the LoRA branch: "exact" (default, PEFT's
    arithmetic bit for bit) or "fast" (in the activation dtype; see `loracast.layers.fastpath`
    and `loracast.set_lora_compute`).
    """

    lora_compute: str = "exact"

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_features(base_layer, fan_in_fan_out)
        self.__dict__.update(fan_in_fan_out=fan_in_fan_out, in_features=in_features, out_features=out_features,
                             quant_backend=find_backend(base_layer))
        self._modules["lora_A"] = build.module_dict()
        self._modules["lora_B"] = build.module_dict()

    def update_layer(self, adapter_name, r, lora_alpha, *, lora_dropout, init_lora_weights, use_rslora,
                     lora_bias, dtype, device):
        self._register_numbers(adapter_name, r, lora_alpha, use_rslora, lora_bias, lora_dropout)
        # values: PEFT's random draws for `init_lora_weights` (layers/init/random_init.py); None: left for a load to fill
        lora_a = build.linear(self.in_features, r, False, dtype, device)
        lora_b = build.linear(r, self.out_features, lora_bias, dtype, device)
        build.put(self.lora_A, adapter_name, lora_a)
        build.put(self.lora_B, adapter_name, lora_b)
        init_factor_pair(lora_a.weight, lora_b.weight, lora_b.bias, init_lora_weights, r,
                         rounding_dtype(self.get_base_layer()))

    def init_from_base(self, adapter_name: str, init: str, loftq_config: dict | None = None) -> None:
        """Start adapter `adapter_name` the PiSSA / OLoRA / LoftQ / orthogonal way (see
        `loracast.layers.init.from_base`); the first three rewrite the base weight (rounded once).

        Raises:
            ConfigError: the base is quantized (these need the float weight), or the rank is odd
                for 'orthogonal'.
        """
        lora_a, lora_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init == "orthogonal":
            values_a, values_b = orthogonal_factors(self.r[adapter_name], self.in_features, self.out_features,
                                                    lora_a.device)
        else:
            if self.quant_backend is not None or not base_weight(self.base_layer).is_floating_point():
                raise ConfigError("init_lora_weights", init,
                                  "True, False, 'gaussian' or 'orthogonal' on a quantized base: PiSSA/OLoRA/LoftQ "
                                  "rewrite the base weight, so load the base in float (bf16/fp16/fp32) to use them "
                                  "(quantize the residual model afterwards)")
            weight = base_weight(self.base_layer)
            original = weight.detach().T if self.fan_in_fan_out else weight.detach()
            scaling = self.scaling[adapter_name]
            if init == "loftq":
                values_a, values_b, quantized = loftq(original, self.r[adapter_name], scaling, loftq_config or {})
            else:
                values_a, values_b = decompose(original, init, self.r[adapter_name], scaling)
        with torch.no_grad():
            lora_a.copy_(values_a)
            lora_b.copy_(values_b)
        if init == "orthogonal":
            return
        if init == "loftq":
            new = quantized  # the quantized base LoftQ fitted the factors to
        else:
            new = residual(original, lora_a, lora_b, scaling)
        with torch.no_grad():  # the one rounding into the base dtype
            weight.copy_((new.T if self.fan_in_fan_out else new).to(weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = None
        if not args and not kwargs and type(self).lora_output is Linear.lora_output:
            name = single_adapter(self, x)
        if name is None:
            return super().forward(x, *args, **kwargs)
        if self.lora_compute == "fast":
            return fast_forward(self, x, name)
        return exact_forward(self, x, name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight_a = self.lora_A[adapter_name].weight
        weight_b = self.lora_B[adapter_name].weight
        dtype = delta_dtype(weight_a)
        delta = (weight_b.to(dtype) @ weight_a.to(dtype)) * self.scaling[adapter_name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    # Merge hooks: a quantized base is read, written and restored through its backend.

    def _read_original_weight(self) -> torch.Tensor:
        if self.quant_backend is None:
            return super()._read_original_weight()
        return quant_merge.read_original(self.quant_backend, self.base_layer, self._weight_restore)

    def _write_merged_weight(self, original: torch.Tensor, merged: torch.Tensor, keep_restore: bool) -> None:
        if self.quant_backend is None:
            return super()._write_merged_weight(original, merged, keep_restore)
        self._weight_restore = quant_merge.write_merged(self.quant_backend, self.base_layer, original, merged,
                                                        self._weight_restore, keep_restore)

    def _restore_original_weight(self) -> None:
        if self.quant_backend is None:
            return super()._restore_original_weight()
        quant_merge.restore_original(self.quant_backend, self.base_layer, self._weight_restore)
        self._weight_restore = None



def linear_features(base_layer: nn.Module, fan_in_fan_out: bool) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer, packed quantized weights included."""
    if hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features"):
        return int(base_layer.in_features), int(base_layer.out_features)
    weight = base_weight(base_layer)
    if weight is None or weight.dim() != 2:
        raise LoracastError(f"cannot read the in/out features of {type(base_layer).__name__}: "
                            "it has no in_features/out_features attributes and no 2-D weight")
    rows, cols = weight.shape
    return (int(rows), int(cols)) if fan_in_fan_out else (int(cols), int(rows))
