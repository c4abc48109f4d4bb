"""Merging LoRA into a quantized base layer, and undoing it exactly.

A merge dequantizes the original weight, adds the adapters' deltas (summed exactly and rounded
once to the dequantized dtype, as for float layers) and quantizes the result back into the layer
the layer's own way. Requantizing rounds, so each merge measures that rounding (merged weight as
the layer now holds it, against the exact merged weight) and reports it in a
`RequantizationWarning`: one warning per model-level merge, or one per layer when a layer is
merged on its own.

Each merged layer also keeps the measure as a record (`REQUANTIZED_ATTR`, read by
`requantization_record`), so a model merged with `merge_and_unload` still says, to the doctor,
that its quantized weights were rounded; an unmerge removes the record.

Unmerge never subtracts: the backend's snapshot of the original quantized weight is put back,
so the packed storage is bit for bit what it was.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loracast.quant.base import QuantBackend


class RequantizationWarning(UserWarning):
    """Merging into a quantized layer rounded the merged weight to the quantization grid."""


@dataclass(frozen=True)
class RequantizationStats:
    """How far a requantized merged weight is from the exact merged weight (its rounding error)."""

    layer: str
    max_abs: float  # largest |requantized - exact| over the weight's elements
    rms: float  # root mean square of requantized - exact
    delta_rms: float  # root mean square of the merged adapters' delta, for scale


_COLLECTED: contextvars.ContextVar[list[RequantizationStats] | None] = contextvars.ContextVar(
    "loracast_requantization_errors", default=None)


REQUANTIZED_ATTR = "loracast_requantized"  # set on a quantized layer that holds a requantized merge

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _warn(message: str) -> None:
    """Warn at the first caller outside loracast (and contextlib), wherever the merge started."""
    frame, level = sys._getframe(1), 2
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE_DIR)
                                 or frame.f_code.co_filename == contextlib.__file__):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RequantizationWarning, stacklevel=level)


def _describe(backend: QuantBackend, module: nn.Module) -> str:
    describe = getattr(backend, "describe", None)
    return describe(module) if callable(describe) else type(module).__name__


def read_original(backend: QuantBackend, module: nn.Module, snapshot: Any) -> torch.Tensor:
    """The float weight of `module` before any merge: from `snapshot` when one is held."""
    if snapshot is None:
        return backend.dequantize(module)
    current = backend.snapshot(module)
    backend.restore(module, snapshot)
    try:
        return backend.dequantize(module)
    finally:
        backend.restore(module, current)


def write_merged(backend: QuantBackend, module: nn.Module, original: torch.Tensor, merged: torch.Tensor,
                 snapshot: Any, keep_restore: bool) -> Any:
    """Quantize `merged` into `module`; returns the snapshot to keep for unmerge (None without
    `keep_restore`). The first merge takes the snapshot; later merges keep that one."""
    if keep_restore and snapshot is None:
        snapshot = backend.snapshot(module)
    backend.requantize(module, merged)
    stats = measure(backend, module, original, merged)
    setattr(module, REQUANTIZED_ATTR, stats)  # outlives merge_and_unload: the doctor reports it later
    _report(stats)
    return snapshot if keep_restore else None


def restore_original(backend: QuantBackend, module: nn.Module, snapshot: Any) -> None:
    """Put the original quantized weight back, bit for bit.

    Raises:
        RuntimeError: no snapshot was kept (the merge was made with keep_restore=False).
    """
    if snapshot is None:
        raise RuntimeError(f"cannot unmerge {_describe(backend, module)}: the merge kept no snapshot of the "
                           "original quantized weight (merge_and_unload keeps none); reload the base model")
    backend.restore(module, snapshot)
    if hasattr(module, REQUANTIZED_ATTR):
        delattr(module, REQUANTIZED_ATTR)


def requantization_record(module: nn.Module) -> RequantizationStats | None:
    """The rounding a merge left in quantized `module` (None when it holds no requantized merge)."""
    record = getattr(module, REQUANTIZED_ATTR, None)
    return record if isinstance(record, RequantizationStats) else None


def measure(backend: QuantBackend, module: nn.Module, original: torch.Tensor,
            merged: torch.Tensor) -> RequantizationStats:
    """The rounding error of the merged weight `module` now holds, against the exact `merged`."""
    exact = merged.detach().double()
    error = backend.dequantize(module).double().reshape(exact.shape) - exact
    delta = exact - original.detach().double()
    return RequantizationStats(_describe(backend, module), float(error.abs().max()),
                               float(error.pow(2).mean().sqrt()), float(delta.pow(2).mean().sqrt()))


@contextlib.contextmanager
def requantization_report() -> Iterator[list[RequantizationStats]]:
    """Collect the rounding errors of the merges inside the block and warn once at its end.

    Nested blocks report through the outermost one.
    """
    if _COLLECTED.get() is not None:
        yield _COLLECTED.get()
        return
    errors: list[RequantizationStats] = []
    token = _COLLECTED.set(errors)
    try:
        yield errors
    finally:
        _COLLECTED.reset(token)
        if errors:
            _warn(summarize(errors))


def _report(error: RequantizationStats) -> None:
    collected = _COLLECTED.get()
    if collected is not None:
        collected.append(error)
    else:
        _warn(summarize([error]))


def summarize(errors: list[RequantizationStats]) -> str:
    """One message describing the rounding of a merge into quantized layers."""
    worst = max(errors, key=lambda e: e.max_abs)
    rms = max(e.rms for e in errors)
    delta_rms = max(e.delta_rms for e in errors)
    share = f" ({rms / delta_rms:.0%} of it)" if delta_rms > 0 else ""
    return (f"merging into {len(errors)} quantized layer(s) requantized their weights, which rounds the merged "
            f"weights: max |error| {worst.max_abs:.3g} (in a {worst.layer}), rms error up to {rms:.3g}, against "
            f"an rms adapter delta up to {delta_rms:.3g}{share}. Outputs of the merged model will differ from the "
            "unmerged one by about this much; unmerge_adapter() restores the original quantized weights exactly")
