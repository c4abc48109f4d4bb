"""The adapter set-up the quantized-backend tests share (torchao, HQQ, quanto): one adapter with
the same options on the first layer of an `nn.Sequential`, for loracast and for PEFT, and a
seeded non-zero B so that merges and outputs depend on the adapter."""

from __future__ import annotations

from typing import Any

import torch

from loracast import LoraConfig
from loracast.layers import LoraLayer

ONE_LAYER = dict(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)


def one_layer_config(**overrides: Any) -> LoraConfig:
    """loracast's config of the shared adapter, with `overrides`."""
    return LoraConfig(**{**ONE_LAYER, **overrides})


def peft_one_layer_config(**overrides: Any):
    """PEFT's config of the shared adapter, with `overrides`."""
    import peft

    return peft.LoraConfig(**{**ONE_LAYER, **overrides})


def randomize_b(lora: LoraLayer, seed: int, std: float = 0.05) -> None:
    """Draw the default adapter's B from N(0, std) with `seed` (it starts at zero)."""
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(std=std, generator=torch.Generator().manual_seed(seed))
