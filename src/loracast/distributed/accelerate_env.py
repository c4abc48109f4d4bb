"""The FSDP1 set-up `accelerate launch` will build, read from the FSDP_* variables it exports.

accelerate's `FullyShardedDataParallelPlugin` reads FSDP_VERSION, FSDP_AUTO_WRAP_POLICY
(NO_WRAP by default), FSDP_TRANSFORMER_CLS_TO_WRAP (default: the model's ``_no_split_modules``),
FSDP_MIN_NUM_PARAMS and FSDP_USE_ORIG_PARAMS (False by default). Mirroring that lets the doctor
predict, before training starts, whether accelerate's FSDP1 will fail to flatten a model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from loracast.distributed.fsdp1 import BlockWrapPolicy
from loracast.distributed.units import transformer_block_classes

_TRUE = ("1", "true", "yes", "y", "on", "t")  # what accelerate's str_to_bool reads as true


def env_true(name: str, environ: Mapping[str, str] = os.environ) -> bool:
    """True when environment variable `name` is set to one of accelerate's spellings of true."""
    return environ.get(name, "").strip().lower() in _TRUE


def accelerate_fsdp_launched(environ: Mapping[str, str] = os.environ) -> bool:
    """True under ``accelerate launch`` with FSDP (it exports ACCELERATE_USE_FSDP)."""
    return env_true("ACCELERATE_USE_FSDP", environ)


class SizeWrapPolicy:
    """FSDP1 policy wrapping modules holding at least `min_num_params` unwrapped elements
    (torch's `size_based_auto_wrap_policy`)."""

    def __init__(self, min_num_params: int) -> None:
        self.min_num_params = min_num_params

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return nonwrapped_numel >= self.min_num_params


@dataclass(frozen=True)
class FSDP1Setup:
    """How FSDP1 will wrap: the auto-wrap policy (None: one root unit), `use_orig_params`, and a
    description for messages."""

    policy: Callable | None
    use_orig_params: bool
    description: str


def accelerate_fsdp1_setup(model: nn.Module, environ: Mapping[str, str] = os.environ) -> FSDP1Setup | None:
    """accelerate's FSDP1 set-up for `model` from its FSDP_* variables; None when it is set to FSDP2.

    Raises:
        ValueError: FSDP_TRANSFORMER_CLS_TO_WRAP names a class the model lacks (accelerate fails too).
    """
    if environ.get("FSDP_VERSION", "1").strip() == "2":
        return None
    use_orig_params = env_true("FSDP_USE_ORIG_PARAMS", environ)
    wrap = environ.get("FSDP_AUTO_WRAP_POLICY", "NO_WRAP").strip().upper()
    policy: Callable | None = None
    if wrap == "TRANSFORMER_BASED_WRAP":
        names = environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
        if names:
            classes = transformer_block_classes(model, [n.strip() for n in names.split(",")])
        else:
            try:
                classes = transformer_block_classes(model)
            except ValueError:  # no _no_split_modules: accelerate then wraps no block
                classes = ()
        policy = BlockWrapPolicy(classes)
        wrap = f"{wrap} ({', '.join(c.__name__ for c in classes)})"
    elif wrap == "SIZE_BASED_WRAP":
        min_num_params = int(environ.get("FSDP_MIN_NUM_PARAMS", "0") or 0)
        policy = SizeWrapPolicy(min_num_params) if min_num_params > 0 else None
    return FSDP1Setup(policy, use_orig_params, f"auto_wrap_policy {wrap}, use_orig_params={use_orig_params}")
