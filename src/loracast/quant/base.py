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
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from loracast.errors import ConfigError


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
# safe to shard with FSDP), used by `repacks_in_eval` and `loracast.quant.sharding`;
# ``describe(module)`` and ``config_record(module)`` (labels for messages, the doctor and the
# fingerprint); ``compute_dtype_fix`` (code that sets a layer's compute dtype, read by
# `compute_dtype_fix` for the doctor); ``upcast_safe`` (False when the layer refuses activations in
# another dtype than its compute dtype: `prepare_model_for_kbit_training` then upcasts nothing);
# ``stored_weight(module)`` (the tensor holding the packed weight, for a layer without ``weight``).

_BACKENDS: list[QuantBackend] = []
# (module that must already be imported, module of ours that registers the backend)
_LAZY: list[tuple[str, str]] = [("bitsandbytes", "loracast.quant.bnb"), ("torchao", "loracast.quant.torchao"),
                                 ("hqq", "loracast.quant.hqq"), ("optimum.quanto", "loracast.quant.quanto")]
# the distributions whose versions decide a quantized base's numbers (recorded in the fingerprint)
QUANT_LIBRARIES = ("bitsandbytes", "torchao", "hqq", "optimum-quanto")
# (tensor or module type, why it is refused and what to do), from the backends: quantized weights or
# layers of a known library that no backend claims (torchao's GPU-only formats, quanto's
# activation-quantized layers)
_REFUSALS: list[tuple[type, str]] = []


def register_backend(backend: QuantBackend) -> None:
    """Make `backend` available to injection, precision rules and merge."""
    if not any(existing.name == backend.name for existing in _BACKENDS):
        _BACKENDS.append(backend)


def register_refusal(refused_type: type, reason: str) -> None:
    """Explain, in `check_adaptable`'s error, why weights (a tensor type) or layers (a module type) of
    `refused_type` that no backend claims are refused (a backend's library also has formats the
    backend does not adapt)."""
    _REFUSALS.append((refused_type, reason))


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


def stored_weight(backend: QuantBackend | None, module: nn.Module) -> torch.Tensor:
    """The tensor that holds `module`'s weight as stored: ``module.weight`` (a float weight or a
    quantized tensor), or what `backend` names for a layer without one (HQQ's packed codes ``W_q``).
    A merge replaces it, so its identity and version say whether the weight changed."""
    getter = getattr(backend, "stored_weight", None)
    return getter(module) if getter is not None else module.weight


def repacks_in_eval(module: nn.Module) -> bool:
    """True for a quantized layer whose eval-mode forward rewrites its own weight (bitsandbytes
    4-bit on an AVX512-BF16 CPU repacks it); loops keep such layers in training mode to evaluate."""
    return bool(getattr(find_backend(module), "repacks_in_eval", False))


def foreign_tensor(tensor: object) -> bool:
    """True for a tensor subclass with its own dispatch (a quantized weight such as torchao's, or
    torchtune's NF4), whose values plain torch operations cannot read; torch's DTensor is not one."""
    if not isinstance(tensor, torch.Tensor):
        return False
    if type(tensor).__torch_dispatch__ is torch.Tensor.__torch_dispatch__:
        return False
    try:
        from torch.distributed.tensor import DTensor  # FSDP2's sharded parameters: plain values, sharded
    except ImportError:  # a torch built without distributed support
        return True
    return not isinstance(tensor, DTensor)


def compute_dtype_fix(backend_name: str) -> str | None:
    """How a user of backend `backend_name` sets its layers' compute dtype (code for the doctor's fix),
    or None when the backend does not say."""
    for backend in _BACKENDS:
        if backend.name == backend_name:
            return getattr(backend, "compute_dtype_fix", None)
    return None


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def check_adaptable(modules: Iterable[tuple[str, nn.Module]]) -> None:
    """Refuse, before anything is changed, a module whose weight is a quantized tensor type, or a
    quantized layer of a refused type (`register_refusal`), that no backend claims: adapting it as a
    float layer would make merges and the doctor fail.

    Raises:
        ConfigError: naming the first such module and its weight's (or its own) type.
    """
    for name, module in modules:
        weight = getattr(module, "weight", None)
        if find_backend(module) is not None:
            continue
        layer_reason = next((text for cls, text in _REFUSALS if isinstance(module, cls)), None)
        if layer_reason is not None and not foreign_tensor(weight):  # a float weight in a refused quantized layer
            raise ConfigError("target_modules", name, f"modules loracast can adapt: {name!r} is a "
                              f"{_qualified(type(module))}, a quantized layer loracast does not adapt. {layer_reason}")
        if not foreign_tensor(weight):
            continue
        reason = layer_reason or next(
            (text for cls, text in _REFUSALS if isinstance(weight, cls)),
            "loracast adapts float weights and the quantized layers of bitsandbytes, torchao, hqq and optimum-quanto "
            "only; leave this module out with exclude_modules")
        raise ConfigError("target_modules", name, f"modules whose weight loracast can read: the weight of {name!r} is a "
                          f"{_qualified(type(weight))}, a quantized tensor type loracast does not adapt. {reason}")
