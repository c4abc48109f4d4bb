"""Precision policies: named presets that set every dtype knob of an adapter at once.

``get_peft_model(model, config, precision=...)`` (and ``add_adapter``, ``load_adapter``,
``PeftModel.from_pretrained``) accepts:

- ``"stable"`` (the default, as PEFT): adapters and modules_to_save copies in float32 on a
  half-precision base, so weights, gradients and optimizer updates keep fp32 precision.
  Same as ``autocast_adapter_dtype=True``.
- ``"mixed"``: float32 adapters as "stable" (weights, gradients, optimizer state), with the
  LoRA branch computed in the activation dtype (`loracast.set_lora_compute` "fast"): mixed
  precision for the adapter, at about the speed of bf16 adapters. Outputs differ from
  "stable" by about one rounding of the activation dtype on the LoRA term.
- ``"fast"``: adapters in their base layer's dtype (a quantized layer's compute dtype): no
  casts in forward, half the adapter memory, bf16 rounding of the updates. Same as
  ``autocast_adapter_dtype=False``.
- ``"fsdp"``: one float dtype for every parameter an FSDP unit flattens: the base's float
  dtype, which the adapters and copies also take. Refused (`PrecisionError`) when the base
  itself is not uniform: several float dtypes, or integer-stored quantized weights (set
  ``bnb_4bit_quant_storage`` to the model dtype).
- ``"match-training"`` (loading only): every adapter tensor in the dtype it had when it was
  saved, read from the fingerprint, and the LoRA compute mode it was trained with; refused
  for an adapter saved without one (by PEFT).

Precedence. Without ``precision=``, the knobs act as documented in `loracast.precision.rules`
(explicit ``adapter_dtype`` > ``autocast_adapter_dtype`` > base dtype), and the choice is
recorded as "stable" (autocast on), "fast" (autocast off) or "custom" (an explicit
``adapter_dtype``). With ``precision=``, the preset sets the knobs; passing
``autocast_adapter_dtype=`` or ``adapter_dtype=`` as well is allowed only when the value is
what the preset sets anyway (``precision="stable", adapter_dtype=torch.float32``); a value
that would change the preset's result is refused with a `PrecisionError` naming both, since
either silent winner would surprise someone.

Adding a policy means adding one function to `POLICIES` that returns a `PrecisionPlan`; the
plan's `lora_compute` field is how "mixed" reaches the LoRA layers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loracast.dtypes import dtype_from_name, dtype_name, parse_dtype
from loracast.errors import PrecisionError
from loracast.precision.rules import HALF_DTYPES
from loracast.quant import find_backend
from loracast.quant.base import foreign_tensor


@dataclass(frozen=True)
class PrecisionPlan:
    """How the dtypes of one adapter are decided; recorded in its fingerprint.

    Attributes:
        policy: "stable", "mixed", "fast", "fsdp", "match-training", or "custom" (adapter_dtype alone).
        autocast_adapter_dtype: the flag passed on to the dtype rules.
        adapter_dtype: the explicit adapter dtype passed on, or None.
        explicit: the caller chose the dtypes (a preset or a knob), rather than the defaults.
        recorded_dtypes: match-training only: file key -> dtype the tensor had when saved.
        lora_compute: how the adapter's LoRA Linear layers compute ("exact" or "fast").
        fast_layers: match-training only: layers (paths in the model) to compute "fast" although
            `lora_compute` is "exact", for an adapter saved while its layers disagreed.
    """

    policy: str
    autocast_adapter_dtype: bool
    adapter_dtype: torch.dtype | None
    explicit: bool
    recorded_dtypes: dict[str, torch.dtype] | None = field(default=None, compare=False)
    lora_compute: str = "exact"
    fast_layers: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready values."""
        return {"policy": self.policy, "autocast_adapter_dtype": self.autocast_adapter_dtype,
                "adapter_dtype": dtype_name(self.adapter_dtype), "explicit": self.explicit,
                "lora_compute": self.lora_compute}


PolicyFunction = Callable[[nn.Module, "bool | None", "torch.dtype | None", "dict | None", bool], PrecisionPlan]


def _conflict(policy: str, knob: str, given: Any, preset: str) -> PrecisionError:
    return PrecisionError(
        f"precision={policy!r} sets {preset}, but {knob}={given!r} was passed as well and would change that; "
        f"drop {knob}= (the preset sets every dtype knob) or drop precision= to set the knobs one by one")


def _stable(model, autocast, adapter_dtype, fingerprint, loading) -> PrecisionPlan:
    if autocast is False:
        raise _conflict("stable", "autocast_adapter_dtype", autocast, "autocast_adapter_dtype=True")
    if adapter_dtype not in (None, torch.float32):
        raise _conflict("stable", "adapter_dtype", adapter_dtype, "float32 adapters")
    return PrecisionPlan("stable", True, adapter_dtype, True)


def _mixed(model, autocast, adapter_dtype, fingerprint, loading) -> PrecisionPlan:
    if autocast is False:
        raise _conflict("mixed", "autocast_adapter_dtype", autocast, "autocast_adapter_dtype=True")
    if adapter_dtype not in (None, torch.float32):
        raise _conflict("mixed", "adapter_dtype", adapter_dtype, "float32 adapters")
    return PrecisionPlan("mixed", True, adapter_dtype, True, lora_compute="fast")


def _fast(model, autocast, adapter_dtype, fingerprint, loading) -> PrecisionPlan:
    if autocast is True:
        raise _conflict("fast", "autocast_adapter_dtype", autocast, "autocast_adapter_dtype=False")
    if adapter_dtype is not None:
        raise _conflict("fast", "adapter_dtype", adapter_dtype, "each adapter to its base layer's compute dtype")
    return PrecisionPlan("fast", False, None, True)


def _fsdp(model, autocast, adapter_dtype, fingerprint, loading) -> PrecisionPlan:
    dtype = uniform_flat_dtype(model)
    if adapter_dtype not in (None, dtype):
        raise _conflict("fsdp", "adapter_dtype", adapter_dtype, f"the base's dtype {dtype} for every parameter")
    if autocast is True and dtype in HALF_DTYPES:
        raise _conflict("fsdp", "autocast_adapter_dtype", autocast, f"{dtype} adapters like the base")
    return PrecisionPlan("fsdp", False, dtype, True)


def _match_training(model, autocast, adapter_dtype, fingerprint, loading) -> PrecisionPlan:
    if not loading:
        raise PrecisionError("precision='match-training' applies when loading a saved adapter "
                             "(PeftModel.from_pretrained / load_adapter); for a new adapter use 'stable', 'fast' "
                             "or 'fsdp'")
    if fingerprint is None:
        raise PrecisionError("precision='match-training' needs the dtypes recorded when the adapter was saved, but "
                             "this adapter has no loracast fingerprint (it was written by PEFT or another tool); "
                             "load it with precision='stable' or 'fast'")
    if autocast is not None:
        raise _conflict("match-training", "autocast_adapter_dtype", autocast, "the dtypes recorded at save")
    if adapter_dtype is not None:
        raise _conflict("match-training", "adapter_dtype", adapter_dtype, "the dtypes recorded at save")
    recorded = {key: dtype_from_name(name) for key, name in fingerprint.get("adapter_dtypes", {}).items()}
    recorded = {key: dtype for key, dtype in recorded.items() if dtype is not None}
    if not recorded:
        raise PrecisionError("precision='match-training': the adapter's fingerprint records no tensor dtypes; "
                             "load it with precision='stable' or 'fast'")
    kinds = set(recorded.values())
    # Create the adapter in the widest recorded dtype, so loading rounds nothing that a
    # tensor's own recorded dtype would keep; each tensor is then cast to its own dtype.
    widest = kinds.pop() if len(kinds) == 1 else max(kinds | {torch.float32}, key=lambda d: torch.finfo(d).bits)
    saved = fingerprint.get("precision") or {}
    compute = saved.get("lora_compute", "exact")  # the policy "mixed" computed "fast"
    if compute == "mixed":  # the layers disagreed at save (fingerprint.adapter_compute_record): layer by layer
        return PrecisionPlan("match-training", False, widest, True, recorded,
                             fast_layers=tuple(saved.get("fast_layers") or ()))
    return PrecisionPlan("match-training", False, widest, True, recorded, lora_compute=compute)


POLICIES: dict[str, PolicyFunction] = {
    "stable": _stable,
    "mixed": _mixed,
    "fast": _fast,
    "fsdp": _fsdp,
    "match-training": _match_training,
}


def resolve_precision(model: nn.Module, precision: str | None = None, autocast_adapter_dtype: bool | None = None,
                      adapter_dtype: torch.dtype | str | None = None, *, fingerprint: dict | None = None,
                      loading: bool = False) -> PrecisionPlan:
    """The `PrecisionPlan` for a new or loaded adapter on `model` (precedence in the module docstring).

    `autocast_adapter_dtype` None means "not given" (PEFT's default, True, applies).
    `fingerprint` is the saved adapter's, when loading.

    Raises:
        PrecisionError: unknown policy, a knob that contradicts the policy, or a base that
            cannot satisfy it.
        ValueError: `adapter_dtype` is not a floating dtype.
    """
    dtype = parse_dtype(adapter_dtype, "adapter_dtype")
    if autocast_adapter_dtype is not None and not isinstance(autocast_adapter_dtype, bool):
        raise TypeError(f"autocast_adapter_dtype must be True or False, got {autocast_adapter_dtype!r}")
    if precision is None:
        autocast = True if autocast_adapter_dtype is None else autocast_adapter_dtype
        policy = "custom" if dtype is not None else ("stable" if autocast else "fast")
        explicit = autocast_adapter_dtype is not None or dtype is not None
        return PrecisionPlan(policy, autocast, dtype, explicit)
    if precision not in POLICIES:
        raise PrecisionError(f"precision={precision!r} is not a precision policy; use one of {sorted(POLICIES)} "
                             "(see loracast.precision.policies)")
    return POLICIES[precision](model, autocast_adapter_dtype, dtype, fingerprint, loading)


def _stored_dtype(model: nn.Module, name: str, param: torch.Tensor) -> torch.dtype:
    """The dtype `param` is stored in: a torchao weight reports its float dtype as `.dtype` but holds
    int8 codes, so a quantized layer's weight is read through its backend."""
    owner, _, leaf = name.rpartition(".")
    if leaf == "weight" and foreign_tensor(param):
        module = model.get_submodule(owner) if owner else model
        backend = find_backend(module)
        if backend is not None:
            return backend.storage_dtype(module)
    return param.dtype


def uniform_flat_dtype(model: nn.Module) -> torch.dtype:
    """The one float dtype all parameters of `model` share, as FSDP's flat parameters need.

    Raises:
        PrecisionError: a parameter is stored in an integer dtype (packed quantized weights), or
            the parameters use several float dtypes; the message names them and the fix.
    """
    by_dtype: dict[torch.dtype, list[str]] = defaultdict(list)
    for name, param in model.named_parameters():
        by_dtype[_stored_dtype(model, name, param)].append(name)
    integer = {d: names for d, names in by_dtype.items() if not d.is_floating_point}
    if integer:
        shown = "; ".join(f"{len(names)} in {dtype_name(d)} (e.g. {names[0]})" for d, names in integer.items())
        raise PrecisionError(
            f"precision='fsdp': FSDP cannot flatten integer tensors, and this model stores {shown}. Load a "
            "4-bit model with BitsAndBytesConfig(..., bnb_4bit_quant_storage=<the model dtype>, e.g. "
            "torch.bfloat16) and dtype=<the same>; 8-bit (int8) layers and the integer codes of torchao, HQQ and "
            "optimum-quanto weights cannot be flattened at all (train those with precision='stable', 'mixed' or "
            "'fast')")
    if not by_dtype:
        return torch.get_default_dtype()
    if len(by_dtype) > 1:
        ranked = sorted(by_dtype.items(), key=lambda item: -len(item[1]))
        shown = "; ".join(f"{len(names)} in {dtype_name(d)} (e.g. {names[0]})" for d, names in ranked)
        raise PrecisionError(
            f"precision='fsdp' needs one float dtype for all parameters, but this model has {shown}. Cast the model "
            f"to one dtype first (model.to(torch.{dtype_name(ranked[0][0])})); note that "
            "prepare_model_for_kbit_training upcasts norms and embeddings to float32")
    return next(iter(by_dtype))


def apply_recorded_dtypes(targets: dict[str, torch.Tensor], plan: PrecisionPlan) -> None:
    """Cast each adapter tensor (file key -> live parameter) to the dtype `plan` recorded for it."""
    if not plan.recorded_dtypes:
        return
    for key, param in targets.items():
        dtype = plan.recorded_dtypes.get(key)
        if dtype is not None and param.dtype != dtype:
            param.data = param.data.to(dtype)
