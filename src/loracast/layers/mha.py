"""LoRA over `nn.MultiheadAttention`, with PEFT's semantics and parameter names.

`nn.MultiheadAttention` has no linear layer to hook for its input projection (one packed
``in_proj_weight`` of shape (3 * embed_dim, embed_dim)) and never calls its ``out_proj``'s
forward. So, as in PEFT, the adapter spans both: ``lora_A``/``lora_B`` of this layer update the
packed input projection, and ``out_proj`` inside the wrapped module is itself wrapped in a LoRA
`Linear` (parameters ``<attn>.base_layer.out_proj.lora_A.<adapter>.weight``). Forward runs the
original module with ``W + delta`` for both weights (the deltas cast to the base dtype and added,
as PEFT does, so gradients reach the factors); dropout on the LoRA input does not apply (the
update is applied to weights, not activations).

Unlike PEFT, forward does not merge into and unmerge from the module's parameters around the
call: the updated weights are handed in with `torch.func.functional_call`, which leaves the
parameters untouched and puts the module back as it was, also when the call raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from loracast.errors import AdapterStateError, LoracastError
from loracast.layers import build
from loracast.layers.base import LoraLayer, delta_dtype
from loracast.layers.linear import Linear
from loracast.layers.routing import routed_adapter_names


class MultiheadAttention(LoraLayer):
    """LoRA on an `nn.MultiheadAttention` with query, key and value of the same size.

    Shapes: lora_A.weight (r, embed_dim); lora_B.weight (3 * embed_dim, r); out_proj carries
    its own LoRA factors as a `Linear` wrapper.
    """

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise LoracastError("LoRA on an nn.MultiheadAttention needs query, key and value of the same size "
                                "(kdim == vdim == embed_dim), as in PEFT; exclude this module from target_modules")
        super().__init__(base_layer)
        self.__dict__.update(in_features=base_layer.embed_dim, out_features=3 * base_layer.embed_dim)
        self._modules["lora_A"] = build.module_dict()
        self._modules["lora_B"] = build.module_dict()
        base_layer.out_proj = Linear(base_layer.out_proj)

    @property
    def out_proj_lora(self) -> Linear:
        """The LoRA wrapper around the wrapped module's output projection."""
        return self.base_layer.out_proj

    def adapter_reference(self) -> nn.Module:
        return self.out_proj_lora.get_base_layer()  # PEFT: device and dtype follow out_proj

    def update_layer(self, adapter_name, r, lora_alpha, *, lora_dropout, init_lora_weights, use_rslora,
                     lora_bias, dtype, device):
        if lora_bias:
            raise LoracastError("lora_bias=True is not supported on an nn.MultiheadAttention; set lora_bias=False "
                                "or exclude the module from target_modules")
        self._register_numbers(adapter_name, r, lora_alpha, use_rslora, lora_bias, lora_dropout)
        init_a = None if init_lora_weights in (None, "gaussian") else "kaiming"
        init_b = None if init_lora_weights is None else ("kaiming" if init_lora_weights is False else "zeros")
        lora_a = build.linear(self.in_features, r, False, dtype, device, init_a)
        build.put(self.lora_A, adapter_name, lora_a)
        build.put(self.lora_B, adapter_name, build.linear(r, self.out_features, False, dtype, device, init_b))
        if init_lora_weights == "gaussian" and device.type != "meta":
            nn.init.normal_(lora_a.weight, std=1 / r)
        self.out_proj_lora.update_layer(
            adapter_name, r, lora_alpha, lora_dropout=lora_dropout, init_lora_weights=init_lora_weights,
            use_rslora=use_rslora, lora_bias=lora_bias, dtype=dtype, device=device)

    # -- the adapter containers of both parts move together ---------------------------------------

    def set_adapter(self, adapter_names: str | Sequence[str], trainable: bool = True) -> None:
        super().set_adapter(adapter_names, trainable)
        self.out_proj_lora.set_adapter(adapter_names, trainable)

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self.out_proj_lora.enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.out_proj_lora.delete_adapter(adapter_name)

    def set_scale(self, adapter_name: str, scale: float) -> None:
        super().set_scale(adapter_name, scale)
        self.out_proj_lora.set_scale(adapter_name, scale)

    def adapter_parameters(self, adapter_name: str):
        yield from super().adapter_parameters(adapter_name)
        yield from self.out_proj_lora.adapter_parameters(adapter_name)

    # -- delta, merge ------------------------------------------------------------------------------

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight_a = self.lora_A[adapter_name].weight
        dtype = delta_dtype(weight_a)
        return (self.lora_B[adapter_name].weight.to(dtype) @ weight_a.to(dtype)) * self.scaling[adapter_name]

    def _merge_target(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    def merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False,
              keep_restore: bool = True) -> None:
        names = self._active_adapters if adapter_names is None else list(adapter_names)
        self.out_proj_lora.merge(names, safe_merge=safe_merge, keep_restore=keep_restore)
        super().merge(names, safe_merge=safe_merge, keep_restore=keep_restore)

    def unmerge(self) -> None:
        super().unmerge()
        self.out_proj_lora.unmerge()

    @property
    def merge_restore_nbytes(self) -> int:
        return LoraLayer.merge_restore_nbytes.fget(self) + self.out_proj_lora.merge_restore_nbytes

    def release_base_layer(self) -> nn.Module:
        self.base_layer.out_proj = self.out_proj_lora.release_base_layer()
        return self.base_layer

    # -- forward ------------------------------------------------------------------------------------

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if routed_adapter_names() is not None:
            raise LoracastError("per-sample adapter_names are not supported on an nn.MultiheadAttention (as in PEFT); "
                                "run one adapter per batch")
        active = [name for name in self._active_adapters if name in self.r]
        if self._disable_adapters or self.merged or not active:
            if self._disable_adapters and self.merged:
                raise AdapterStateError("adapters are disabled while merged into the base weight; call "
                                        "unmerge_adapter() first")
            return self.base_layer(query, *args, **kwargs)
        out_proj = self.out_proj_lora.get_base_layer()
        in_weight, out_weight = self.base_layer.in_proj_weight, out_proj.weight
        in_delta = sum(self._factor_delta(self, name) for name in active)
        out_delta = sum(self._factor_delta(self.out_proj_lora, name) for name in active)
        updated = {"in_proj_weight": in_weight + in_delta.to(in_weight.dtype),
                   "out_proj.base_layer.weight": out_weight + out_delta.to(out_weight.dtype)}
        output, weights = torch.func.functional_call(self.base_layer, updated, (query, *args), kwargs)
        return output.to(query.dtype), (weights.to(query.dtype) if weights is not None else None)

    @staticmethod
    def _factor_delta(layer: LoraLayer, name: str) -> torch.Tensor:
        """``B @ A * scaling`` in the adapter dtype, with gradients (what PEFT adds in forward)."""
        return (layer.lora_B[name].weight @ layer.lora_A[name].weight) * layer.scaling[name]
