"""The `QuantBackend` protocol and its registry.

A LoRA layer never inspects a quantized base layer itself: it asks the backend that claims the
layer for the layer's storage dtype, its compute dtype, a dequantized weight, and a way to
write a merged weight back. Adding torchao or hqq later means adding a backend, not touching
the LoRA layers. Backends for optional libraries are registered lazily, only once their
library has been imported by the user (a model cannot hold their layers otherwise), so
loracast imports and works without them.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class QuantBackend(Protocol):
    """What loracast needs to know about, and do to, one kind of quantized linear layer."""

    name: str

    def handles(self, module: nn.Module) -> bool:
        """True when `module` is a quantized layer of this backend."""

    def storage_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype the packed weight is stored in (uint8, int8, or a float carrier)."""

    def compute_dtype(self, module: nn.Module) -> torch.dtype | None:
        """The dtype the layer computes its matmul in, or None when the layer does not say."""

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The layer's weight as a float tensor of shape (out_features, in_features)."""

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Replace the layer's weight by `weight` (float), quantized the layer's way."""

    def snapshot(self, module: nn.Module) -> Any:
        """Everything needed to put the quantized weight back bit for bit."""

    def restore(self, module: nn.Module, state: Any) -> None:
        """Put back a `snapshot`."""


# Optional backend members, read with getattr: ``repacks_in_eval`` (True when the layer's
# eval-mode forward rewrites its own weight) and ``prepare_for_sharding(module)`` (makes the layer
# safe to shard with FSDP), used by `repacks_in_eval` and `loracast.quant.sharding`.

_BACKENDS: list[QuantBackend] = []
# (module that must already be imported, module of ours that registers the backend)
_LAZY: list[tuple[str, str]] = [("bitsandbytes", "loracast.quant.bnb")]


def register_backend(backend: QuantBackend) -> None:
    """Make `backend` available to injection, precision rules and merge."""
    if not any(existing.name == backend.name for existing in _BACKENDS):
        _BACKENDS.append(backend)


def _load_lazy_backends() -> None:
    for library, ours in list(_LAZY):
        if sys.modules.get(library) is not None:  # None marks a module blocked from import
            _LAZY.remove((library, ours))
            importlib.import_module(ours)


def find_backend(module: nn.Module) -> QuantBackend | None:
    """The backend that claims `module`, or None for a plain float layer."""
    _load_lazy_backends()
    for backend in _BACKENDS:
        if backend.handles(module):
            return backend
    return None


def repacks_in_eval(module: nn.Module) -> bool:
    """True for a quantized layer whose eval-mode forward rewrites its own weight (bitsandbytes
    4-bit on an AVX512-BF16 CPU repacks it); loops keep such layers in training mode to evaluate."""
    return bool(getattr(find_backend(module), "repacks_in_eval", False))
