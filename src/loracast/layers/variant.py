"""`LoraVariant`: how one adapter turns its factors into the layer's update, and plain LoRA.

A `LoraLayer` holds one variant per adapter (``layer.lora_variant[name]``) and asks it for the
adapter's part of the output and of a merged weight; it knows no variant by name. Plain LoRA
adds ``B(A(x)) * s`` to the output and ``s * B@A`` to the weight; a variant such as DoRA
(`loracast.layers.dora`) may own extra per-adapter tensors (kept in containers on the layer, so
their state-dict names are PEFT's) and compute both parts differently.

Which variant an adapter gets is decided once, from its `LoraConfig`, by the table in
`loracast.layers.variant_registry`; a new variant is a module implementing this interface plus
an entry in that table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

import torch

from loracast.layers.merge import exact_sum, round_once


class LoraLayer(Protocol):
    """What a variant reads of its layer (`loracast.layers.base.LoraLayer` provides it; named
    here rather than imported, as that module imports this one)."""

    lora_variant: dict[str, LoraVariant]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor: ...

    def lora_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor: ...


class LoraVariant:
    """One adapter's arithmetic: its forward contribution and its merged weight.

    The default methods are plain LoRA's; a variant overrides what it changes. Instances may keep
    caches for their adapter (one instance per adapter); what must be saved lives in the layer's
    containers named by `containers`.

    Attributes:
        title: the name used in messages ("LoRA", "DoRA").
        containers: per-adapter containers the variant adds to the layer (joined to its
            `adapter_layer_names`, so gradients, deletion, moves and saving see them).
        flag: the layer's per-adapter dict PEFT keeps for this variant ("use_dora"), set True for
            the adapters it serves; None for none.
        plain: its update is exactly ``B(A(x)) * s``, so the fused fast paths and the chunked
            exact merge apply.
        per_sample: it may serve per-sample `adapter_names` (mixed batches).
    """

    title: ClassVar[str] = "LoRA"
    containers: ClassVar[tuple[str, ...]] = ()
    flag: ClassVar[str | None] = None
    plain: ClassVar[bool] = True
    per_sample: ClassVar[bool] = True

    def create(self, layer: LoraLayer, adapter_name: str, *, dtype: torch.dtype, device: torch.device,
               initialize: bool) -> None:
        """Add the variant's own tensors for `adapter_name` (already added by `update_layer`), in
        `dtype` on `device`; `initialize` False leaves them for a load to fill."""

    def forward(self, layer: LoraLayer, x: torch.Tensor, adapter_name: str, result: torch.Tensor) -> torch.Tensor:
        """`result` (the output so far) with adapter `adapter_name` applied to input `x`."""
        return result + layer.lora_output(x, adapter_name)

    def merge(self, layer: LoraLayer, adapter_name: str, original: torch.Tensor, delta: torch.Tensor,
              current: torch.Tensor) -> None:
        """Apply the adapter to `current`, the float64 weight merged so far, in place. `original`
        is the unmerged base weight and `delta` the adapter's `get_delta_weight`, both float64."""
        current += delta


PLAIN = LoraVariant()  # stateless: every plain adapter shares it


def merged_weight(layer: LoraLayer, original: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """The base weight `original` with adapters `names` merged in order, computed in float64 and
    rounded once to ``original.dtype``.

    Plain adapters only: the deltas are summed chunk by chunk (`exact_sum`, a chunk's worth of
    float64 at a time). Otherwise each variant in turn updates one float64 copy of the weight.
    """
    variants = [layer.lora_variant[name] for name in names]
    if all(variant.plain for variant in variants):
        return exact_sum(original, [layer.get_delta_weight(name) for name in names])
    w0 = original.detach().to(torch.float64)
    current = w0.clone()
    for name, variant in zip(names, variants):
        delta = layer.get_delta_weight(name).to(device=w0.device, dtype=torch.float64)
        variant.merge(layer, name, w0, delta, current)
    return round_once(current, original.dtype)
