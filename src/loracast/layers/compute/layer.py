"""What the compute paths read of a LoRA layer, declared as a `Protocol` (LoRA `Linear` provides it).

The exact and fast paths are functions of a layer, not methods on it, so they are typed against
this small interface rather than against `loracast.layers.linear.Linear`: the compute package
never imports the layer kinds that call it, and reads only the public members named here.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn


class PlainOrNot(Protocol):
    """What the compute paths read of an adapter's variant (`loracast.layers.variant.LoraVariant`):
    whether its update is plain LoRA's ``B(A(x)) * s``, the only one they compute."""

    plain: bool


@runtime_checkable
class ComputeLayer(Protocol):
    """A LoRA layer as the compute paths see it (`loracast.layers.linear.Linear` is one).

    Attributes:
        base_layer: the wrapped module; its output is the sum's other term.
        lora_A, lora_B: per-adapter factors, modules with a ``weight`` of shape (r, in) and (out, r).
        lora_dropout: per-adapter dropout (`nn.Identity` when there is none).
        scaling, lora_bias, lora_variant: per-adapter alpha/r, whether ``lora_B`` has a bias, the
            adapter's variant (`LoraVariant`; the paths compute only a plain one).
        fan_in_fan_out: the base stores its weight as (in, out) (GPT-2's Conv1D).
        lora_compute: the layer's compute mode, "exact" or "fast" (`loracast.layers.compute.modes`).
    """

    base_layer: nn.Module
    lora_A: nn.ModuleDict
    lora_B: nn.ModuleDict
    lora_dropout: nn.ModuleDict
    scaling: dict[str, float]
    lora_bias: dict[str, bool]
    lora_variant: dict[str, PlainOrNot]
    fan_in_fan_out: bool
    lora_compute: str
    merged_adapters: list[str]

    @property
    def active_adapters(self) -> list[str]:
        """Adapters applied in forward, in order."""
        ...

    @property
    def disable_adapters(self) -> bool:
        """True while adapters are switched off."""
        ...
