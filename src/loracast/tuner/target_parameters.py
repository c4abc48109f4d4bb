"""Placing `target_parameters` adapters: LoRA on named `nn.Parameter`s, as PEFT matches them.

An entry matches the parameter whose full name (module path without wrappers, then the
parameter's own name) equals it or ends with ``"." + entry``. A module whose parameters are
targeted is wrapped once per parameter, in the order the module registered them, the later
outside (PEFT's nesting, hence PEFT's names: ``experts.lora_A...`` for the outer parameter,
``experts.base_layer.lora_A...`` for the inner one). A second adapter reuses the wrappers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from loracast.config import LoraConfig
from loracast.errors import ConfigError
from loracast.layers import LoraLayer
from loracast.layers.target_parameters import ParamWrapper
from loracast.precision.rules import apply_adapter_rule, declared_dtype
from loracast.tuner.walk import replace_child, walk


def _wrappers_of(slot: nn.Module) -> dict[str, ParamWrapper]:
    """Parameter name -> the wrapper adapting it, along a nest of wrappers."""
    found = {}
    while isinstance(slot, ParamWrapper):
        found[slot.parameter_name] = slot
        slot = slot.base_layer
    return found


def _full_name(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


def _matches(key: str, targets: list[str]) -> bool:
    return any(key == t or key.endswith("." + t) for t in targets)


def inject_parameters(model: nn.Module, config: LoraConfig, adapter_name: str, rank_alpha: Callable[[str], tuple[int, float]], *,
                      autocast_adapter_dtype: bool = True, adapter_dtype: torch.dtype | None = None,
                      initialize: bool = True) -> list[str]:
    """Add adapter `adapter_name` to every parameter `config.target_parameters` names; returns
    their full names. `rank_alpha(name)` gives the (r, alpha) for a parameter's full name.

    Raises:
        ConfigError: an entry matches no parameter, or a parameter sits on a module that
            target_modules adapts too, or on the model itself.
    """
    targets = sorted(set(config.target_parameters or []))
    if not targets:
        return []
    model_dtype = declared_dtype(model)
    init = config.init_lora_weights if initialize else None
    done: list[str] = []
    for node in walk(model, stop=(LoraLayer,)):
        slot = node.module
        real = ParamWrapper.real_module(slot)
        wanted = [(_full_name(node.name, p), p) for p in real._parameters if _matches(_full_name(node.name, p), targets)]
        if isinstance(slot, LoraLayer) and not isinstance(slot, ParamWrapper):
            wanted = [(_full_name(node.name, p), p) for p in slot.get_base_layer()._parameters
                      if _matches(_full_name(node.name, p), targets)]
            if wanted:
                raise ConfigError("target_parameters", config.target_parameters,
                                  f"parameters of modules target_modules does not adapt: {node.name!r} is in both "
                                  "(drop it from one of them)")
            continue
        if not wanted:
            continue
        if node.parent is None:
            raise ConfigError("target_parameters", config.target_parameters,
                              "parameters of submodules: a parameter of the model object itself cannot be wrapped")
        for key, param_name in wanted:
            layer = _wrappers_of(slot).get(param_name)
            if layer is None:
                layer = ParamWrapper(slot, param_name)
                replace_child(node.parent, node.attr, layer)
                slot = layer
            param = layer.get_param()
            base_dtype = param.dtype if param.is_floating_point() else (model_dtype or torch.get_default_dtype())
            r, alpha = rank_alpha(key)
            layer.update_layer(
                adapter_name, r, alpha, lora_dropout=config.lora_dropout, init_lora_weights=init,
                use_rslora=config.use_rslora, lora_bias=config.lora_bias,
                dtype=apply_adapter_rule(base_dtype, autocast_adapter_dtype, adapter_dtype), device=param.device)
            done.append(key)
    if not done:
        raise ConfigError("target_parameters", config.target_parameters,
                          "names of nn.Parameters of the model (full names or their last parts, e.g. "
                          "'mlp.experts.gate_up_proj')")
    return done
