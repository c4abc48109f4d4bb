"""A read-only view of where the adapter tensors and base weights of a model are.

The fingerprint, the precision policies and the doctor all need the same walk: which
parameters belong to an adapter (and in which role: A, B, a bias, a magnitude, a
modules_to_save copy), which belong to the base, and what each adapted base layer stores and
computes in. The walk is duck-typed so that it reads PEFT's layers as well as loracast's: a
LoRA layer is a module with ``adapter_layer_names`` and ``get_base_layer()``; a
modules_to_save wrapper is a module with ``original_module`` and a ``modules_to_save``
ModuleDict. Both libraries name their parts this way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from loracast.precision.rules import base_compute_dtype, base_weight
from loracast.quant import find_backend

# Container name -> the role its tensors play, as the doctor's table shows it.
ROLES: dict[str, str] = {
    "lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
    "lora_magnitude_vector": "magnitude", "trainable_tokens_delta": "tokens",
}
_LORA_PARTS = frozenset(ROLES)


@dataclass
class AdapterTensor:
    """One parameter of one adapter, as found in a live model."""

    module: str        # path of the adapted module (the LoRA layer or modules_to_save wrapper)
    adapter: str       # adapter name
    role: str          # "A", "B", "B.bias", "magnitude", "copy"
    name: str          # full parameter name in the model
    tensor: torch.Tensor


@dataclass
class BaseLayerInfo:
    """What an adapted (or quantized) base layer stores its weight in and computes in."""

    module: str
    storage: torch.dtype | None
    compute: torch.dtype | None
    backend: str | None  # quantization backend name, None for a float layer
    device: str | None
    config: str | None = None  # the config a merge requantizes with, for backends that say (torchao)
    config_source: str | None = None  # "supplied" (recorded when quantizing) or "inferred" (read from the weight)


def is_lora_layer(module: nn.Module) -> bool:
    """True for a LoRA layer of loracast or PEFT."""
    return hasattr(type(module), "adapter_layer_names") and callable(getattr(module, "get_base_layer", None))


def is_saved_wrapper(module: nn.Module) -> bool:
    """True for a modules_to_save wrapper of loracast or PEFT."""
    return isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict) and \
        isinstance(getattr(module, "original_module", None), nn.Module)


def adapter_tensors_of(model: nn.Module) -> Iterator[AdapterTensor]:
    """Every adapter parameter in `model`, with its module, adapter name and role."""
    for path, module in model.named_modules():
        prefix = path + "." if path else ""
        if is_lora_layer(module):
            for container_name in module.adapter_layer_names:
                container = getattr(module, container_name, None)
                if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                    continue
                role = ROLES.get(container_name, container_name)
                for adapter, entry in container.items():
                    where = f"{prefix}{container_name}.{adapter}"
                    if isinstance(entry, nn.Parameter):
                        yield AdapterTensor(path, adapter, role, where, entry)
                        continue
                    for name, param in entry.named_parameters():
                        shown = f"{role}.bias" if name.endswith("bias") else role
                        yield AdapterTensor(path, adapter, shown, f"{where}.{name}", param)
        elif is_saved_wrapper(module):
            for adapter, copy in module.modules_to_save.items():
                for name, param in copy.named_parameters():
                    yield AdapterTensor(path, adapter, "copy", f"{prefix}modules_to_save.{adapter}.{name}", param)


def adapter_part(name: str) -> str | None:
    """What a parameter is, by its full name: "lora" under a LoRA container (``lora_A``,
    ``lora_B``, ...), "copy" in a ``modules_to_save`` copy, None for a base parameter. The names
    are the same in loracast and PEFT; this is the one place that decides it."""
    parts = name.split(".")
    if "modules_to_save" in parts:
        return "copy"
    return None if _LORA_PARTS.isdisjoint(parts) else "lora"


def base_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter of `model` that belongs to no adapter (`adapter_part`)."""
    for name, param in model.named_parameters():
        if adapter_part(name) is None:
            yield name, param


def float_dtype_counts(model: nn.Module) -> Counter:
    """dtype -> number of values, over the base parameters that are floating point."""
    counts: Counter = Counter()
    for _, param in base_parameters(model):
        if param.is_floating_point():
            counts[param.dtype] += param.numel()
    return counts


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The float dtype most base values are stored in (None for a model without float weights)."""
    counts = float_dtype_counts(model)
    return counts.most_common(1)[0][0] if counts else None


def base_layer_info(path: str, layer: nn.Module) -> BaseLayerInfo:
    """Storage dtype, compute dtype and backend of one (base) layer."""
    backend = find_backend(layer)
    weight = base_weight(layer)
    if backend is not None:
        storage = backend.storage_dtype(layer)
        compute = backend.compute_dtype(layer)
    else:
        storage = weight.dtype if weight is not None else None
        compute = base_compute_dtype(layer)
    device = str(weight.device) if weight is not None else None
    config_record = getattr(backend, "config_record", None)
    config, source = config_record(layer) if callable(config_record) else (None, None)
    return BaseLayerInfo(path, storage, compute, backend.name if backend is not None else None, device, config, source)


def quantized_layers(model: nn.Module) -> Iterator[BaseLayerInfo]:
    """`BaseLayerInfo` for every layer a quantization backend claims."""
    for path, module in model.named_modules():
        if find_backend(module) is not None:
            yield base_layer_info(path, module)
