"""Precision policies as the `train` command names them, and how they reach `get_peft_model`.

"stable": adapters (and modules_to_save copies) in float32 whatever the base dtype — their
weights, gradients and AdamW updates keep full precision (PEFT's default).
"fast": adapters in the base's (compute) dtype — half the adapter memory and no casts between
the base and the LoRA branch, at the cost of rounding every small update to bf16/fp16.

When `get_peft_model` accepts ``precision=`` (the named presets of the precision-policy work),
the name is passed through unchanged; until then it maps onto ``autocast_adapter_dtype``.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..model import get_peft_model

POLICIES = ("stable", "fast")
# The autocast_adapter_dtype flag each policy means, for a get_peft_model without `precision=`.
_AUTOCAST_FLAG = {"stable": True, "fast": False}


def peft_model_kwargs(policy: str) -> dict[str, Any]:
    """Keyword arguments for `get_peft_model` that apply `policy`.

    Raises:
        ValueError: unknown policy.
    """
    if policy not in POLICIES:
        raise ValueError(f"precision policy {policy!r} is not known; use one of {', '.join(POLICIES)}")
    if "precision" in inspect.signature(get_peft_model).parameters:
        return {"precision": policy}
    return {"autocast_adapter_dtype": _AUTOCAST_FLAG[policy]}
