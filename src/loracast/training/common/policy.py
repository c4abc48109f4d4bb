"""The precision policies `loracast train` offers, and how a run applies one.

The policies are `loracast.precision.policies`' presets ("stable": float32 adapters and head copy on
any base, PEFT's default; "fast": adapters in the base's (compute) dtype; "fsdp": one uniform
float dtype for everything). "match-training" applies only when loading a saved adapter, so
training does not offer it.
"""

from __future__ import annotations

from typing import Any

from loracast.precision.policies import POLICIES

TRAIN_POLICIES = tuple(name for name in POLICIES if name != "match-training")


def peft_model_kwargs(policy: str) -> dict[str, Any]:
    """Keyword arguments for `get_peft_model` that apply `policy`.

    Raises:
        ValueError: `policy` is not one training can use.
    """
    if policy not in TRAIN_POLICIES:
        raise ValueError(f"precision policy {policy!r} cannot be used for training; use one of "
                         f"{', '.join(TRAIN_POLICIES)}")
    return {"precision": policy}
