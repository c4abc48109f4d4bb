"""bitsandbytes backends: `Linear4bit` (nf4/fp4, any quant_storage) and `Linear8bitLt`.

Imported by `loracast.quant.base` only once the user has imported bitsandbytes, so loracast
itself never needs it. The LoRA layers never look inside a bitsandbytes layer; they ask these
objects for the storage dtype, the compute dtype, a float copy of the weight, and for a way to
write a merged weight back (requantize) and to put the original back bit for bit (snapshot and
restore).

Two things bitsandbytes does on its own that the code below respects:

* On a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode, with an input that does not
  require grad, repacks the weight in place into a CPU-friendly layout (``uint8`` data, bf16
  absmax, no double quantization; ``quant_state.packing_format_for_cpu`` is set). So the storage
  dtype is read live, never cached, and `dequantize` reads either layout without changing it.
* A `Linear8bitLt` moves its int8 weight and row scales from the parameter into its
  ``MatmulLtState`` on the first forward. A snapshot therefore keeps both the parameter and the
  state object.

Snapshots keep the original parameter objects rather than copies: requantizing builds new ones,
so the originals stay untouched until `restore` puts them back.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes import functional as bnb_f
from torch import nn

from loracast.quant.base import register_backend


def _nbytes(*tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# -- 4-bit ---------------------------------------------------------------------------------------

@dataclass
class Snapshot4bit:
    """The original `Params4bit` of a `Linear4bit` and the module's own quant-state reference."""

    weight: nn.Parameter
    module_quant_state: Any

    @property
    def nbytes(self) -> int:
        """Memory the snapshot keeps alive (packed data plus quantization statistics)."""
        state = self.weight.quant_state
        extra = []
        if state is not None:
            extra = [state.absmax, getattr(state, "offset", None)]
            if getattr(state, "state2", None) is not None:
                extra += [state.state2.absmax, state.state2.code]
        return _nbytes(self.weight.data, *extra)


def _is_cpu_packed(state: Any) -> bool:
    return bool(getattr(state, "packing_format_for_cpu", False))


def _unpack_cpu_layout(weight: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """(packed 4-bit data in the standard layout, a standard QuantState) for a weight bitsandbytes
    has repacked for its CPU kernel; `weight` and `state` are left as they are."""
    inverse = getattr(bnb_f, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise RuntimeError(
            f"this Linear4bit weight is in bitsandbytes' CPU-packed layout, but bitsandbytes "
            f"{bnb.__version__} has no _convert_weight_packed_for_cpu_inverse to read it; call "
            "model.train() before the first forward (the repacking only happens in eval mode) or "
            "use bitsandbytes 0.48-0.50")
    scratch = copy.copy(state)  # the inverse edits the state it is given; a shallow copy suffices
    scratch.original_nested = False  # skip its lossy re-quantization of absmax; we rebuild absmax below
    data, _ = inverse(weight.data.clone(), scratch)
    rows, cols = state.shape
    absmax = state.absmax.T.reshape(-1).float()  # packed absmax is (cols/blocksize, rows), bf16
    standard = bnb_f.QuantState(absmax=absmax, shape=torch.Size((rows, cols)), code=state.code,
                                blocksize=state.blocksize, quant_type=state.quant_type,
                                dtype=state.original_dtype)
    return data, standard


class Bnb4bitBackend:
    """`bitsandbytes.nn.Linear4bit` (LinearNF4/LinearFP4 included)."""

    name = "bitsandbytes-4bit"
    repacks_in_eval = True  # on AVX512-BF16 CPUs (see the module docstring): loops evaluate it in training mode

    def handles(self, module: nn.Module) -> bool:
        return isinstance(module, bnb.nn.Linear4bit)

    def prepare_for_sharding(self, module: nn.Module) -> None:
        """Put a CPU-repacked weight back in the standard layout, in place, and stop the layer from
        repacking again (`loracast.quant.sharding` says why FSDP needs this). Only CPU inference at
        batch size 1 is given up (the repacked kernel); training never used it."""
        weight = module.weight
        if _is_cpu_packed(weight.quant_state):
            weight.data, weight.quant_state = _unpack_cpu_layout(weight, weight.quant_state)
            module.quant_state = weight.quant_state
        module.support_avx512bf16_for_cpu = False  # the switch Linear4bit.forward reads before repacking

    def storage_dtype(self, module: nn.Module) -> torch.dtype:
        # the requested carrier dtype; the tensor itself turns uint8 when bitsandbytes repacks it in
        # place for the CPU kernel on the first eval-mode forward
        return getattr(module.weight, "quant_storage", None) or module.weight.dtype

    def compute_dtype(self, module: nn.Module) -> torch.dtype | None:
        return getattr(module, "compute_dtype", None)

    def weight_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype of the float weight that was quantized (what `dequantize` returns)."""
        state = module.weight.quant_state
        return state.original_dtype if _is_cpu_packed(state) else state.dtype

    def describe(self, module: nn.Module) -> str:
        """A short label for messages, e.g. 'Linear4bit nf4 (64x64)'."""
        return f"{type(module).__name__} {module.weight.quant_type} ({module.out_features}x{module.in_features})"

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        weight = module.weight
        state = weight.quant_state
        if state is None:
            raise RuntimeError(f"{self.describe(module)} is not quantized yet (its weight has no quant_state); "
                               "move it to a device first, e.g. layer.to('cpu')")
        if _is_cpu_packed(state):
            data, state = _unpack_cpu_layout(weight, state)
        else:
            data = weight.data
        return bnb_f.dequantize_4bit(data, state)

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        old = module.weight
        fresh = bnb.nn.Params4bit(
            weight.detach().to(device="cpu", dtype=self.weight_dtype(module)).contiguous(),
            requires_grad=False, blocksize=old.blocksize, compress_statistics=old.compress_statistics,
            quant_type=old.quant_type, quant_storage=old.quant_storage, module=module)
        module.weight = fresh.to(old.device)  # quantizes on the move, and sets module.quant_state

    def snapshot(self, module: nn.Module) -> Snapshot4bit:
        return Snapshot4bit(module.weight, getattr(module, "quant_state", None))

    def restore(self, module: nn.Module, state: Snapshot4bit) -> None:
        module.weight = state.weight
        module.quant_state = state.module_quant_state


# -- 8-bit ---------------------------------------------------------------------------------------

@dataclass
class Snapshot8bit:
    """The original `Int8Params` of a `Linear8bitLt`, with its row scales, and its matmul state."""

    weight: nn.Parameter
    weight_cb: torch.Tensor | None
    weight_scb: torch.Tensor | None
    state: Any

    @property
    def nbytes(self) -> int:
        """Memory the snapshot keeps alive (int8 data plus row scales)."""
        scales = self.weight_scb if self.weight_scb is not None else self.state.SCB
        return _nbytes(self.weight.data, scales)


class Bnb8bitBackend:
    """`bitsandbytes.nn.Linear8bitLt` (LLM.int8: int8 weight, one float scale per output row)."""

    name = "bitsandbytes-8bit"

    def handles(self, module: nn.Module) -> bool:
        return isinstance(module, bnb.nn.Linear8bitLt)

    def storage_dtype(self, module: nn.Module) -> torch.dtype:
        return module.weight.dtype

    def compute_dtype(self, module: nn.Module) -> torch.dtype | None:
        # The layer computes in whatever dtype its input has; it carries no intended float dtype.
        return None

    def describe(self, module: nn.Module) -> str:
        """A short label for messages, e.g. 'Linear8bitLt int8 (64x64)'."""
        return f"{type(module).__name__} int8 ({module.out_features}x{module.in_features})"

    def _scales(self, module: nn.Module) -> torch.Tensor | None:
        scales = module.state.SCB
        return scales if scales is not None else getattr(module.weight, "SCB", None)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        weight = module.weight
        if weight.dtype != torch.int8:  # has_fp16_weights=True: the weight is kept in float
            return weight.detach().clone()
        scales = self._scales(module)
        if scales is None:
            raise RuntimeError(f"{self.describe(module)} has int8 data but no row scales (SCB); "
                               "it was not quantized by bitsandbytes")
        return bnb_f.int8_vectorwise_dequant(weight.data, scales.to(weight.device))

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        old = module.weight
        if old.dtype != torch.int8:
            module.weight = bnb.nn.Int8Params(weight.detach().to(old.dtype), requires_grad=False,
                                              has_fp16_weights=old.has_fp16_weights)
            return
        fresh = bnb.nn.Int8Params(weight.detach().to("cpu", torch.float32).contiguous(), requires_grad=False,
                                  has_fp16_weights=old.has_fp16_weights)
        module.weight = fresh.to(old.device)  # quantizes on the move: data = CB (int8), SCB = row scales
        # A fresh matmul state, so the next forward takes CB/SCB from the new weight (not the old ones).
        state = bnb.MatmulLtState()
        for field in ("threshold", "has_fp16_weights", "use_pool", "is_training"):
            setattr(state, field, getattr(module.state, field))
        module.state = state

    def snapshot(self, module: nn.Module) -> Snapshot8bit:
        weight = module.weight
        return Snapshot8bit(weight, getattr(weight, "CB", None), getattr(weight, "SCB", None), module.state)

    def restore(self, module: nn.Module, state: Snapshot8bit) -> None:
        state.weight.CB = state.weight_cb
        state.weight.SCB = state.weight_scb
        module.weight = state.weight
        module.state = state.state


register_backend(Bnb4bitBackend())
register_backend(Bnb8bitBackend())
