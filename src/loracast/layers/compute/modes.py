"""The compute modes of LoRA Linear layers: "exact" (default) or "fast", set and read per model.

``"exact"`` is PEFT's arithmetic, bit for bit: the LoRA branch runs in the adapter dtype
(fp32 adapters on a bf16 base cast each activation to fp32), is added to the base output in
the promoted dtype, and the sum is cast back once.

``"fast"`` is fp32 adapters at bf16 speed: the branch runs in the activation dtype from the
adapter weights cast once per forward (they are tiny), and is added to the base output by one
matmul-add. Adapter weights, their gradients and the optimizer state stay in the adapter dtype
(the weight gradients are bf16 matmuls accumulated in fp32, as under ``torch.autocast``, stored
in fp32). What changes is where the branch is rounded: outputs and gradients differ from "exact"
by about one rounding in the activation dtype (bf16: ~0.4 % relative on the LoRA term). This is
the trade mixed-precision training makes for the base model (fp32 master weights, bf16 compute)
and what ``torch.autocast`` does for matmuls.

``get_peft_model(..., precision="mixed")`` is "fast" with float32 adapters. The mode is a
per-layer attribute (`LoraLayer.lora_compute`), which only layer kinds that offer a choice
(`LoraLayer.compute_modes`: LoRA Linear) let you switch; the others always compute exactly. Layers
added later (a new adapter on new modules) start in "exact" unless added with
``precision="mixed"``; `set_lora_compute` switches any of them at any time.

Since the mode belongs to the layer, an adapter that shares layers with a "mixed" one, or whose
layers were switched by hand, can compute "fast" in some layers and "exact" in others: what it
did is read from its layers (`adapter_compute_record`), which the fingerprint records and the
doctor reports.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from loracast.errors import LoracastError
from loracast.layers.base import LoraLayer
from loracast.layers.compute.dispatch import LORA_COMPUTE_MODES


def _check_mode(mode: str) -> str:
    if mode not in LORA_COMPUTE_MODES:
        raise LoracastError(f"lora_compute={mode!r} is not a compute mode; use one of {list(LORA_COMPUTE_MODES)}: "
                            "'exact' (PEFT's arithmetic, the default) or 'fast' (LoRA branch in the activation dtype)")
    return mode


def _switchable(module: nn.Module) -> bool:
    """True for a LoRA layer whose kind offers more than one compute mode (LoRA Linear)."""
    return isinstance(module, LoraLayer) and len(module.compute_modes) > 1


def set_lora_compute(model: nn.Module, mode: str, adapter_name: str | None = None) -> int:
    """Set how the LoRA Linear layers in `model` compute their branch; returns how many were set.

    ``get_peft_model(..., precision="mixed")`` does this for the new adapter.

    Args:
        model: a `PeftModel`, or any module holding loracast LoRA layers.
        mode: "exact" or "fast" (see the module docstring).
        adapter_name: only the layers holding this adapter (default: all).

    Raises:
        ValueError: `mode` is not a compute mode, or `model` holds no LoRA Linear layer.
    """
    _check_mode(mode)
    count = 0
    for module in model.modules():
        if _switchable(module) and (adapter_name is None or adapter_name in module.r):
            module.lora_compute = mode
            count += 1
    if not count:
        kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, LoraLayer)})
        raise LoracastError(f"{type(model).__name__} holds no LoRA Linear layer to set lora_compute on "
                            f"(LoRA layers found: {kinds or 'none'}); call set_lora_compute after get_peft_model")
    return count


def get_lora_compute(model: nn.Module) -> str | None:
    """The compute mode of the LoRA Linear layers in `model`; "mixed" when they differ, None when there are none."""
    modes = {module.lora_compute for module in model.modules() if _switchable(module)}
    if not modes:
        return None
    return modes.pop() if len(modes) == 1 else "mixed"


def adapter_compute_record(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    """How the layers holding `adapter_name` compute its LoRA branch, read from the layers:
    ``{"lora_compute": "exact" | "fast"}``, or ``"mixed"`` with ``"fast_layers"`` (their paths
    in `model`) when the layers disagree. Layers other than LoRA Linear always compute "exact"."""
    by_mode: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            by_mode.setdefault(module.lora_compute, []).append(path)
    if len(by_mode) < 2:
        return {"lora_compute": next(iter(by_mode), "exact")}
    return {"lora_compute": "mixed", "fast_layers": sorted(by_mode.get("fast", []))}
