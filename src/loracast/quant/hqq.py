"""HQQ backend: `hqq.core.quantize.HQQLinear` layers (any bit width, group size and axis).

An `HQQLinear` replaces the `nn.Linear`: it holds the packed codes as ``W_q`` (uint8, or int32
for 3 bits), the scales and zero points in its ``meta`` dict, and its own quantization settings
in ``quant_config``; it dequantizes to its ``compute_dtype`` and computes in it, so that is the
layer's compute dtype (the adapter dtype with ``autocast_adapter_dtype=False``) and ``W_q``'s
dtype is the storage dtype.

A merge requantizes with the layer's own ``quant_config`` through the layer's own ``quantize``,
in place: the layer object stays the same (PEFT instead swaps in a new `HQQLinear`). HQQ's
quantizer optimizes the zero points, so requantizing even an unchanged weight moves it a little;
the `RequantizationWarning` reports what a merge rounded. Unmerge puts the original ``W_q``
parameter and ``meta`` dict back, the same objects: bit for bit.

Errors raised inside hqq while merging are re-raised as `LoracastError` naming the layer and the
fix. Imported by `loracast.quant.base` only once the user has imported hqq.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from hqq.core.quantize import HQQLinear
from torch import nn

from loracast.errors import LoracastError
from loracast.quant.base import register_backend


@dataclass
class SnapshotHqq:
    """The original packed codes, quantization metadata and bias of an `HQQLinear` (the objects, not copies)."""

    w_q: torch.Tensor
    meta: dict[str, Any]
    bias: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        """Memory the snapshot keeps alive: the codes and the tensors of the metadata."""
        tensors = [self.w_q, *(v for v in self.meta.values() if isinstance(v, torch.Tensor))]
        return sum(t.numel() * t.element_size() for t in tensors)


def _weight_params(module: nn.Module) -> dict[str, Any]:
    return (module.quant_config or {}).get("weight_quant_params") or {}


@contextmanager
def _hqq_errors(module: nn.Module, doing: str, fix: str) -> Iterator[None]:
    """Re-raise an error from inside hqq as a `LoracastError` that says what failed and what to do."""
    try:
        yield
    except LoracastError:
        raise
    except Exception as exc:  # hqq raises AssertionError, KeyError, RuntimeError...: one loracast error instead
        raise LoracastError(f"hqq failed to {doing} {HqqBackend().describe(module)}: {type(exc).__name__}: {exc}; "
                            f"{fix}") from exc


class HqqBackend:
    """`hqq.core.quantize.HQQLinear`, quantized (``W_q`` and ``meta`` set)."""

    name = "hqq"
    # its forward needs activations in its compute dtype: prepare_model_for_kbit_training upcasts nothing
    upcast_safe = False
    # how the user gives an HQQ layer the compute dtype an adapter is meant to match (the doctor's fix)
    compute_dtype_fix = ("# HQQ computes in the compute_dtype its layers were quantized with:\n"
                         "HQQLinear(linear, quant_config, compute_dtype=torch.bfloat16, device=\"cpu\")  "
                         "# or transformers' HqqConfig with dtype=torch.bfloat16")

    def handles(self, module: nn.Module) -> bool:
        return isinstance(module, HQQLinear)

    def storage_dtype(self, module: nn.Module) -> torch.dtype:
        return module.W_q.dtype

    def stored_weight(self, module: nn.Module) -> torch.Tensor:
        """The packed codes ``W_q`` (an `HQQLinear` has no ``weight``); a merge or unmerge swaps them."""
        return module.W_q

    def compute_dtype(self, module: nn.Module) -> torch.dtype | None:
        return module.compute_dtype

    def bits(self, module: nn.Module) -> str:
        """E.g. '4-bit group 64': the bit width and group size of the layer's quant_config."""
        params = _weight_params(module)
        group = params.get("group_size")
        return f"{params.get('nbits', '?')}-bit" + (f" group {group}" if group else "")

    def describe(self, module: nn.Module) -> str:
        """A short label for messages, e.g. 'HQQLinear 4-bit group 64 (48x64)'."""
        return f"HQQLinear {self.bits(module)} ({module.out_features}x{module.in_features})"

    def config_record(self, module: nn.Module) -> tuple[str, str]:
        """(the settings merges requantize with, "supplied"): the layer carries its own quant_config."""
        params = _weight_params(module)
        shown = ", ".join(f"{key}={params[key]}" for key in ("nbits", "group_size", "axis") if key in params)
        return f"HQQ({shown})", "supplied"

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        if not getattr(module, "ready", False) or module.W_q is None:
            raise LoracastError(f"{self.describe(module)} is not quantized yet (W_q is unset); build it from a "
                                "linear layer (HQQLinear(linear, quant_config, ...)) or load its weights first")
        with _hqq_errors(module, "dequantize", "check that the layer's W_q and meta belong together"):
            weight = module.dequantize()
        return weight.reshape(module.out_features, module.in_features)

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        config = {k: v for k, v in (module.quant_config or {}).items() if k != "offload_meta"}
        weight = weight.detach().to(device=module.W_q.device, dtype=module.compute_dtype).contiguous()
        old = module.W_q
        # quantize() assigns a plain tensor to W_q before wrapping it in a Parameter, which nn.Module
        # refuses while W_q is a registered parameter
        del module.W_q
        try:
            with _hqq_errors(module, "requantize the merged weight of",
                             "keep the adapter unmerged, or merge into a float copy of the base model"):
                module.quantize(weight, **config)  # in place: new W_q and meta, with the layer's own settings
        except LoracastError:
            module.W_q = old
            raise

    def snapshot(self, module: nn.Module) -> SnapshotHqq:
        return SnapshotHqq(module.W_q, module.meta, module.bias)

    def restore(self, module: nn.Module, state: SnapshotHqq) -> None:
        module.W_q, module.meta, module.bias = state.w_q, state.meta, state.bias
        module.in_features, module.out_features = state.meta["shape"][::-1]


def quantize_linear(linear: nn.Linear, nbits: int = 4, group_size: int = 64,
                    compute_dtype: torch.dtype | None = None) -> nn.Module:
    """`linear` quantized by HQQ on its own device: an `HQQLinear` with ``nbits`` and ``group_size``,
    computing in `compute_dtype` (default: the dtype of `linear`'s weight)."""
    from hqq.core.quantize import BaseQuantizeConfig

    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    return HQQLinear(linear, config, compute_dtype=compute_dtype or linear.weight.dtype,
                     device=str(linear.weight.device))


def quantize_base(model: nn.Module, nbits: int = 4, group_size: int = 64,
                  filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Replace the linear layers of `model` by HQQ layers, in place (every `nn.Linear` but the output
    head by default; `filter_fn(module, name)` chooses otherwise). Apply it before `get_peft_model`.
    Returns `model`."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    accept = filter_fn or (lambda module, _name: type(module) is nn.Linear and module is not head)
    chosen = [(name, module) for name, module in model.named_modules() if name and accept(module, name)]
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, quantize_linear(module, nbits, group_size))
    return model


register_backend(HqqBackend())
