"""The table of LoRA variants: which `LoraConfig` field turns each on, and which `LoraVariant`
class serves each layer kind.

Plain LoRA is what an adapter gets when no field in `VARIANTS` is set. Adding a variant is a
module implementing `loracast.layers.variant.LoraVariant` per layer kind it supports, plus one
entry here; a layer kind missing from an entry is refused with an error naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loracast.config import LoraConfig
from loracast.errors import ConfigError
from loracast.layers.base import LoraLayer
from loracast.layers.conv import Conv
from loracast.layers.dora import DoraConv, DoraEmbedding, DoraLinear
from loracast.layers.embedding import Embedding
from loracast.layers.linear import Linear
from loracast.layers.variant import LoraVariant


@dataclass(frozen=True)
class VariantEntry:
    """One variant: the boolean config field that selects it, and its class per layer kind."""

    field: str
    by_layer: dict[type[LoraLayer], type[LoraVariant]]


VARIANTS: tuple[VariantEntry, ...] = (
    VariantEntry("use_dora", {Linear: DoraLinear, Conv: DoraConv, Embedding: DoraEmbedding}),
)


def add_variant(layer: LoraLayer, adapter_name: str, config: LoraConfig, where: str, *, dtype: torch.dtype,
                device: torch.device, initialize: bool) -> None:
    """Give adapter `adapter_name` of `layer` (at `where` in the model) the variant `config`
    selects, its tensors in `dtype` on `device`; nothing for plain LoRA.

    Raises:
        ConfigError: the config selects more than one variant, or one that this layer kind lacks.
    """
    chosen = [entry for entry in VARIANTS if getattr(config, entry.field)]
    if len(chosen) > 1:
        fields = [entry.field for entry in chosen]
        raise ConfigError(fields[1], True, f"False: {', '.join(fields)} cannot be combined; set one of them")
    if not chosen:
        return
    entry = chosen[0]
    variant_class = next((entry.by_layer[kind] for kind in type(layer).__mro__ if kind in entry.by_layer), None)
    if variant_class is None:
        kinds = ", ".join(kind.__name__ for kind in entry.by_layer)
        raise ConfigError(entry.field, True, f"False for {where!r}: a {type(layer.get_base_layer()).__name__} has "
                          f"no such variant (it exists for LoRA layers of kind {kinds}, as in PEFT); exclude the "
                          f"module from target_modules or set {entry.field}=False")
    layer.set_variant(adapter_name, variant_class(), dtype=dtype, device=device, initialize=initialize)
