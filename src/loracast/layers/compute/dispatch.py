"""Which path a LoRA Linear forward takes: the layer's compute mode, or the general path.

`LoraLayer.forward` (the general path) handles every case: several adapters, variants such as
DoRA, ``lora_bias``, per-sample adapter names, merged or disabled adapters, autocast. The common
case, one active plain adapter, runs the layer's compute mode instead (`exact` or `fast`), and
`compute_forward` is the one place that decides it.
"""

from __future__ import annotations

import torch

from loracast.layers.compute.direct import global_hooks, plain_factor
from loracast.layers.compute.exact import exact_forward
from loracast.layers.compute.fast import fast_forward
from loracast.layers.compute.layer import ComputeLayer
from loracast.layers.routing import routed_adapter_names
from loracast.precision.rules import autocast_active

LORA_COMPUTE_MODES: tuple[str, ...] = ("exact", "fast")  # the modes `compute_forward` runs (see `modes`)


def single_adapter(layer: ComputeLayer, x: torch.Tensor) -> str | None:
    """The one active adapter when the compute modes apply to this call, else None.

    They apply to a float input of 2+ dims, one active plain LoRA adapter (no ``lora_bias``, no
    variant such as DoRA), no per-sample adapter names, nothing merged or disabled, no autocast,
    and adapter factors that are plain `nn.Linear` modules without hooks (others are called as
    modules by the general path).
    """
    if layer.disable_adapters or layer.merged_adapters or routed_adapter_names() is not None:
        return None
    active = layer.active_adapters
    if len(active) != 1 or not x.is_floating_point() or x.dim() < 2:
        return None
    name = active[0]
    if layer.lora_bias.get(name) or not layer.lora_variant[name].plain or autocast_active(x.device.type) \
            or global_hooks():
        return None
    if not (plain_factor(layer.lora_A[name]) and plain_factor(layer.lora_B[name])):
        return None
    return name


def compute_forward(layer: ComputeLayer, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output for `x` in its compute mode, or None when the general path must run."""
    name = single_adapter(layer, x)
    if name is None:
        return None
    if layer.lora_compute == "fast":  # else "exact"
        return fast_forward(layer, x, name)
    return exact_forward(layer, x, name)
