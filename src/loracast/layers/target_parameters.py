"""LoRA on a named `nn.Parameter` (PEFT's `target_parameters`), 3-D expert stacks included.

Mixture-of-experts models keep each expert's projection as one slice of a 3-D parameter
(``experts.gate_up_proj`` of shape (experts, out, in) in Qwen3-MoE) rather than as an
`nn.Linear`, so there is no module to wrap. `ParamWrapper` wraps the module holding the
parameter and, during its forward only, hands that module the parameter plus the LoRA update.
Names and layouts are PEFT's: ``lora_A`` is an `nn.Linear(in, r * experts)` and ``lora_B`` an
`nn.Linear(r * experts, out)`; expert ``e`` uses rows ``e*r .. e*r+r-1`` of A and columns
``e, e+experts, ...`` of B. Two parameters of one module are two nested wrappers, the one for
the parameter registered later outside, as PEFT nests them.

Precision: PEFT rounds the update to the parameter's dtype and adds it there (two roundings on a
bf16 base); here the update is added in the adapter dtype (float32 on a half base with autocast
on) and the sum rounded once. Merge and unmerge are the shared exact ones (`LoraLayer.merge`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from loracast.errors import ConfigError, LoracastError
from loracast.layers import build
from loracast.layers.base import LoraLayer, delta_dtype
from loracast.layers.routing import routed_adapter_names


class ParamWrapper(LoraLayer):
    """``module(x)`` computed with ``module.<parameter_name> + delta`` in place of the parameter.

    Shapes: a 2-D parameter (out, in) is one expert; a 3-D one is (experts, out, in), or
    (experts, in, out) when the module says ``is_transposed`` (gpt-oss).
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        param = self._param_of(base_layer, parameter_name)
        if param.dim() == 3:
            experts = param.shape[0]
            transposed = bool(getattr(self.real_module(base_layer), "is_transposed", False))
            in_features, out_features = (param.shape[1], param.shape[2]) if transposed else (param.shape[2], param.shape[1])
        elif param.dim() == 2:
            experts, transposed = 1, False
            out_features, in_features = param.shape
        else:
            raise LoracastError(f"target_parameters: {parameter_name!r} has {param.dim()} dimensions; LoRA adapts "
                                "2-D (out, in) and 3-D (experts, ...) parameters only")
        self.__dict__.update(parameter_name=parameter_name, num_experts=int(experts), in_features=int(in_features),
                             out_features=int(out_features), transposed=transposed)
        self._modules["lora_A"] = build.module_dict()
        self._modules["lora_B"] = build.module_dict()

    @staticmethod
    def real_module(module: nn.Module) -> nn.Module:
        """The module that owns the parameters, below any nested wrappers."""
        while isinstance(module, ParamWrapper):
            module = module.base_layer
        return module

    def _param_of(self, base_layer: nn.Module, name: str) -> torch.Tensor:
        return getattr(self.real_module(base_layer), name)

    def get_param(self) -> torch.Tensor:
        """The wrapped parameter (without any update)."""
        return self._param_of(self.base_layer, self.parameter_name)

    def _merge_target(self) -> torch.Tensor:
        return self.get_param()

    def update_layer(self, adapter_name, r, lora_alpha, *, lora_dropout, init_lora_weights, use_rslora,
                     lora_bias, dtype, device):
        if lora_dropout:
            raise ConfigError("lora_dropout", lora_dropout, "0 with target_parameters: dropout acts on a layer's "
                              "input, which a parameter's update cannot see (as PEFT)")
        if lora_bias:
            raise ConfigError("lora_bias", lora_bias, "False with target_parameters (as PEFT)")
        if isinstance(init_lora_weights, str) and init_lora_weights != "gaussian":
            raise ConfigError("init_lora_weights", init_lora_weights,
                              "True, False or 'gaussian' with target_parameters: the initialisations from the base "
                              "weight apply to linear layers only")
        self._register_numbers(adapter_name, r, lora_alpha, use_rslora, lora_bias, 0.0)
        init_a = None if init_lora_weights in (None, "gaussian") else "kaiming"
        init_b = None if init_lora_weights is None else ("kaiming" if init_lora_weights is False else "zeros")
        lora_a = build.linear(self.in_features, r * self.num_experts, False, dtype, device, init_a)
        lora_b = build.linear(r * self.num_experts, self.out_features, False, dtype, device, init_b)
        if init_lora_weights == "gaussian" and lora_a.weight.device.type != "meta":
            nn.init.normal_(lora_a.weight, std=1 / r)
        build.put(self.lora_A, adapter_name, lora_a)
        build.put(self.lora_B, adapter_name, lora_b)

    def _delta(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        """The update of one adapter in `dtype`, in the parameter's layout."""
        weight_a = self.lora_A[adapter_name].weight.to(dtype)
        weight_b = self.lora_B[adapter_name].weight.to(dtype)
        scaling = self.scaling[adapter_name]
        if self.num_experts == 1 and self.get_param().dim() == 2:
            return (weight_b @ weight_a) * scaling
        experts = self.num_experts
        a = weight_a.reshape(experts, -1, weight_a.shape[-1])  # (experts, r, in)
        b = weight_b.reshape(weight_b.shape[0], -1, experts).permute(2, 0, 1)  # (experts, out, r)
        delta = torch.bmm(b, a) * scaling  # (experts, out, in)
        return delta.transpose(1, 2) if self.transposed else delta

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self._delta(adapter_name, delta_dtype(self.lora_A[adapter_name].weight))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if routed_adapter_names() is not None:
            raise LoracastError("per-sample adapter_names cannot be used with target_parameters adapters (as PEFT)")
        names = [n for n in self._active_adapters if n in self.r]
        if self._disable_adapters or self.merged or not names:
            return super().forward(x, *args, **kwargs)  # the base alone (and the shared checks)
        param = self.get_param()
        dtype = self.lora_A[names[0]].weight.dtype
        total = sum(self._delta(n, dtype) for n in names)
        # one rounding into the parameter's dtype, of the sum computed in the adapter dtype
        updated = (param.to(dtype) + total).to(param.dtype)
        return functional_call(self.base_layer, {self._path_in_base(): updated}, (x, *args), kwargs)

    def _path_in_base(self) -> str:
        path, module = self.parameter_name, self.base_layer
        while isinstance(module, ParamWrapper):
            path, module = "base_layer." + path, module.base_layer
        return path

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, " + super().extra_repr()
