"""FSDP1 (`FullyShardedDataParallel`, as accelerate and Trainer configure it) with mixed dtypes.

FSDP1 flattens every unit's parameters into one tensor, so a unit must hold one dtype, no
integer storage and, with ``use_orig_params=False``, only trainable or only frozen parameters.
A bf16 base with fp32 adapters (loracast's default "stable" precision, as PEFT's) wrapped per
transformer block breaks all of these: torch raises "Must flatten tensors with uniform dtype".

Two ways out:

* `fsdp1_auto_wrap_policy(model)`: every module that directly holds parameters unlike the
  frozen base (the LoRA A/B layers, modules_to_save copies) becomes a unit of its own, next to
  one unit per transformer block, so adapters stay fp32 and both ``use_orig_params`` settings work;
* one uniform dtype for everything: ``get_peft_model(..., precision="fsdp")`` gives adapters the
  base's dtype; a per-block unit then still mixes trainable and frozen tensors, so it needs
  ``use_orig_params=True``.

`fsdp1_flatten_problems` predicts the failure from the module tree alone (the doctor calls it),
`check_fsdp1` raises it as one clear error, and `explain_flatten_errors` turns torch's own error
into one that names the fix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from loracast.distributed.units import (
    FSDPSetupError,
    UnitProblem,
    format_problems,
    group_names,
    label,
    transformer_block_classes,
    unit_parameters,
)
from loracast.quant.sharding import prepare_quantized_for_sharding

POLICY_FIX = "auto_wrap_policy=loracast.distributed.fsdp1_auto_wrap_policy(model)"
QUANT_FIX = ("load the quantized model with a float storage dtype equal to its dtype, e.g. "
             "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage=torch.bfloat16) with "
             "from_pretrained(..., dtype=torch.bfloat16)")
UNIFORM_FIX = ("or give every parameter one dtype with get_peft_model(model, config, precision=\"fsdp\") and wrap "
               "with use_orig_params=True")


def _dominant_frozen_key(model: nn.Module) -> tuple[torch.dtype, bool] | None:
    """(dtype, requires_grad=False) of the bulk of the frozen base, by element count."""
    totals: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if not param.requires_grad:
            totals[param.dtype] = totals.get(param.dtype, 0) + param.numel()
    return (max(totals, key=totals.__getitem__), False) if totals else None


class BlockWrapPolicy:
    """An FSDP1 auto-wrap policy with one unit per transformer block (torch's
    `transformer_auto_wrap_policy`); called as ``policy(module=..., recurse=..., nonwrapped_numel=...)``."""

    def __init__(self, block_classes: tuple[type, ...]) -> None:
        self.block_classes = block_classes

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return recurse or isinstance(module, self.block_classes)  # recurse: always look inside


class SeparateAdaptersPolicy(BlockWrapPolicy):
    """An FSDP1 auto-wrap policy: one unit per transformer block, and one per module that directly
    holds parameters of another dtype or trainability than the frozen base (LoRA A/B layers,
    modules_to_save copies), so no unit mixes them."""

    def __init__(self, block_classes: tuple[type, ...], base_key: tuple[torch.dtype, bool] | None) -> None:
        super().__init__(block_classes)
        self.base_key = base_key

    def needs_own_unit(self, module: nn.Module) -> bool:
        """True when `module` directly holds parameters unlike the frozen base."""
        return any((p.dtype, p.requires_grad) != self.base_key for p in module.parameters(recurse=False))

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return super().__call__(module, recurse, nonwrapped_numel) or self.needs_own_unit(module)


def fsdp1_auto_wrap_policy(model: nn.Module, block_classes: Iterable[type | str] | None = None
                           ) -> SeparateAdaptersPolicy:
    """An FSDP1 ``auto_wrap_policy`` that keeps trainable adapters and the frozen base in separate units.

    Use it as ``FullyShardedDataParallel(model, auto_wrap_policy=fsdp1_auto_wrap_policy(model), ...)``
    or set it on accelerate's ``FullyShardedDataParallelPlugin.auto_wrap_policy``. Block classes
    come from `block_classes` or the model's ``_no_split_modules``; a model without either still
    gets separate adapter units (and one root unit for the rest). bitsandbytes 4-bit layers are
    made safe to shard (`prepare_quantized_for_sharding`); they need a float
    ``bnb_4bit_quant_storage`` equal to the model dtype, as FSDP1 cannot flatten integers.

    Raises:
        ValueError: a class named in `block_classes` is not in the model.
    """
    if block_classes is None:
        try:
            classes = transformer_block_classes(model)
        except ValueError:
            classes = ()
    else:
        classes = transformer_block_classes(model, block_classes)
    prepare_quantized_for_sharding(model)
    return SeparateAdaptersPolicy(classes, _dominant_frozen_key(model))


def _policy_units(model: nn.Module, policy: Callable | None, ignored: set[nn.Module]) -> set[nn.Module]:
    """The modules FSDP1 would wrap for `policy` (the root is always a unit and is left out)."""
    if policy is None:
        return set()
    run_policy = getattr(policy, "_run_policy", None)  # torch's _Policy objects (ModuleWrapPolicy, CustomPolicy)
    if run_policy is not None:
        return {m for m in run_policy(model, ignored, {}) if m is not model}
    wrapped: set[nn.Module] = set()

    def visit(module: nn.Module, is_root: bool) -> int:
        # mirrors torch.distributed.fsdp.wrap._recursive_wrap: returns the element count wrapped
        numel = sum(p.numel() for p in module.parameters())
        if not policy(module=module, recurse=True, nonwrapped_numel=numel):
            return 0
        done = sum(visit(child, False) for child in module.children() if child not in ignored)
        if not is_root and policy(module=module, recurse=False, nonwrapped_numel=numel - done):
            wrapped.add(module)
            return numel
        return done

    visit(model, True)
    return wrapped


def fsdp1_flatten_problems(model: nn.Module, auto_wrap_policy: Callable | None = None, *,
                           use_orig_params: bool = False,
                           ignored_modules: Iterable[nn.Module] | None = None) -> list[UnitProblem]:
    """The units FSDP1 would fail to flatten for this model and wrap policy (empty: it will work).

    Pure: looks at the module tree only; needs no process group. Checks what torch checks when
    it flattens a unit: float storage, one dtype, and one ``requires_grad`` unless `use_orig_params`.
    """
    ignored = set(ignored_modules or ())
    ignored_params = {id(p) for m in ignored for p in m.parameters()}
    problems: list[UnitProblem] = []
    for unit, params in unit_parameters(model, _policy_units(model, auto_wrap_policy, ignored)).items():
        params = [(n, p) for n, p in params if id(p) not in ignored_params]
        if not params:
            continue
        integer = [(n, p) for n, p in params if not p.is_floating_point()]
        if integer:
            problems.append(UnitProblem(unit, "integer-storage", group_names(integer, label), QUANT_FIX))
            continue
        if len({p.dtype for _, p in params}) > 1:
            problems.append(UnitProblem(unit, "mixed-dtype", group_names(params, label),
                                        f"{POLICY_FIX}, {UNIFORM_FIX}"))
        elif not use_orig_params and len({p.requires_grad for _, p in params}) > 1:
            problems.append(UnitProblem(unit, "mixed-requires-grad", group_names(params, label),
                                        f"{POLICY_FIX}, or use_orig_params=True"))
    return problems


def check_fsdp1(model: nn.Module, auto_wrap_policy: Callable | None = None, *, use_orig_params: bool = False,
                ignored_modules: Iterable[nn.Module] | None = None) -> None:
    """Raise before wrapping if FSDP1 would fail to flatten `model` with this policy.

    Raises:
        FSDPSetupError: at least one unit mixes dtypes, trainability or integer storage; the
            message names each unit, its parameters, and the fix.
    """
    problems = fsdp1_flatten_problems(model, auto_wrap_policy, use_orig_params=use_orig_params,
                                      ignored_modules=ignored_modules)
    if problems:
        raise FSDPSetupError(format_problems(problems, "FSDP1 cannot flatten this model with this wrap policy"))


# What torch says when a unit cannot be flattened (the last: its pre-check for `_Policy` objects).
_TORCH_FLATTEN_ERRORS = ("Must flatten tensors with uniform", "Cannot flatten integer dtype tensors",
                         "has both parameters with requires_grad=True and False")


@contextlib.contextmanager
def explain_flatten_errors() -> Iterator[None]:
    """Turn torch's FSDP1 flattening errors raised inside the block into an `FSDPSetupError` that says
    how to fix them (the original error is kept as the cause).

    Wrap the call that builds FSDP1: ``FullyShardedDataParallel(...)``, ``accelerator.prepare(...)``
    or ``trainer.train()``.
    """
    try:
        yield
    except ValueError as exc:
        text = str(exc)
        if isinstance(exc, FSDPSetupError) or not any(marker in text for marker in _TORCH_FLATTEN_ERRORS):
            raise
        if "integer" in text:
            fix = QUANT_FIX
        elif "requires_grad" in text:
            fix = f"{POLICY_FIX} (adapters and frozen base in separate units), or use_orig_params=True"
        else:
            fix = f"{POLICY_FIX} (adapters and frozen base in separate units), {UNIFORM_FIX}"
        first_line = text.splitlines()[0]
        raise FSDPSetupError(f"FSDP1 could not flatten a unit: {first_line.rstrip('.')}. A unit holds parameters that cannot "
                             f"share one flat tensor; fix: {fix}. loracast.distributed.fsdp1_flatten_problems("
                             "model, policy) lists every unit at fault") from exc
