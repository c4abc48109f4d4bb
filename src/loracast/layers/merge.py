"""Exact merge and bit-for-bit unmerge.

A merge writes ``round(W0 + sum of the merged adapters' deltas)`` into the base weight: the
deltas are computed in float64 (fp32 on MPS) and the sum in float64, so the base dtype is rounded to
exactly once, however many adapters are merged. Unmerge does not subtract (subtraction drifts:
PEFT's bf16 merge/unmerge changes a few percent of the weights); it restores ``W0`` from a
`BitResidual`, the difference between the bit patterns of the merged and the original weight.

Memory: for bf16/fp16 weights the difference of the 16-bit patterns is small wherever the delta
is small relative to the weight, so it is stored as int8 (half of a copy) with the rare wide
entries kept aside (index + value); when too many are wide, as a dense int16 (the size of a
copy). fp32 weights usually need the full 32 bits: a copy's size. `merge_restore_nbytes` on the
model reports the total. `merge_and_unload` keeps nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from loracast.errors import LoracastError

# Elements processed per step, so the float64/int64 temporaries stay small on big weights.
_CHUNK = 1 << 22

_BITS_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def round_once(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 `values` rounded to `dtype` once (to nearest, ties to even).

    torch converts float64 to bf16 and fp16 through float32, which rounds twice: a value just
    above a bf16 midpoint can first round onto the midpoint and then, as a tie, to even (the
    wrong way). Rounding to float32 "to odd" instead (toward zero, then the last bit set when
    inexact) keeps the information the second rounding needs; with 16 spare bits the result is
    the correctly rounded one (Boldo & Melquiond's round-to-odd).
    """
    if values.dtype != torch.float64 or dtype not in (torch.bfloat16, torch.float16):
        return values.to(dtype)
    nearest = values.to(torch.float32)
    back = nearest.to(torch.float64)
    bits = nearest.view(torch.int32)
    bits = bits - (back.abs() > values.abs()).to(torch.int32)  # toward zero (sign-magnitude: -1 shrinks |x|)
    bits = bits | (back != values).to(torch.int32)  # odd when inexact
    return bits.view(torch.float32).to(dtype)


def exact_sum(weight: torch.Tensor, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """``weight + sum(deltas)`` computed in float64 and rounded once to ``weight.dtype``."""
    flat_w = weight.detach().reshape(-1)
    flat_d = [d.detach().reshape(-1) for d in deltas]
    out = torch.empty_like(flat_w)
    for start in range(0, flat_w.numel(), _CHUNK):
        end = min(start + _CHUNK, flat_w.numel())
        acc = flat_w[start:end].to(torch.float64)
        for d in flat_d:
            acc += d[start:end].to(device=acc.device, dtype=torch.float64)
        out[start:end] = round_once(acc, weight.dtype)
    return out.view(weight.shape)


def _wrap(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Two's-complement wrap of integers into a signed `bits`-bit range."""
    half = 1 << (bits - 1)
    return torch.remainder(values + half, 1 << bits) - half


@dataclass
class BitResidual:
    """What turns a merged tensor back into its original, bit for bit.

    ``mode`` is "int8" (dense int8 differences plus wide outliers), "dense" (differences in the
    weight's own width, wrapped) or "copy" (the original itself, for dtypes without a bit view).
    """

    mode: str
    shape: torch.Size
    dtype: torch.dtype
    dense: torch.Tensor
    outlier_index: torch.Tensor | None = None
    outlier_value: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Memory held by this record."""
        total = self.dense.numel() * self.dense.element_size()
        for extra in (self.outlier_index, self.outlier_value):
            if extra is not None:
                total += extra.numel() * extra.element_size()
        return total

    @classmethod
    def between(cls, original: torch.Tensor, merged: torch.Tensor) -> BitResidual:
        """The record that restores `original` from `merged` (same shape and dtype)."""
        original = original.detach()
        int_view = _BITS_VIEW.get(original.dtype)
        if int_view is None:
            return cls("copy", original.shape, original.dtype, original.clone())
        bits = torch.iinfo(int_view).bits
        diff = _bit_difference(original.reshape(-1), merged.detach().reshape(-1), int_view)
        wide = (diff < -128) | (diff > 127)
        n_wide = int(wide.sum())
        n = diff.numel()
        index_dtype = torch.int32 if n < 2**31 else torch.int64
        int8_cost = n + n_wide * (torch.tensor([], dtype=index_dtype).element_size() + bits // 8)
        if int8_cost < n * bits // 8:
            index = wide.nonzero().reshape(-1)
            value = _wrap(diff[index], bits).to(int_view)
            dense = diff.masked_fill(wide, 0).to(torch.int8)
            return cls("int8", original.shape, original.dtype, dense, index.to(index_dtype), value)
        return cls("dense", original.shape, original.dtype, _wrap(diff, bits).to(int_view))

    def restore(self, merged: torch.Tensor) -> torch.Tensor:
        """The original tensor, given the merged one this record was made against."""
        if self.mode == "copy":
            return self.dense.clone()
        int_view = _BITS_VIEW[self.dtype]
        bits = torch.iinfo(int_view).bits
        wide_int = torch.int32 if bits == 16 else torch.int64
        diff = self.dense.to(wide_int)
        if self.outlier_index is not None and self.outlier_index.numel():
            diff[self.outlier_index.long()] = self.outlier_value.to(wide_int)
        merged_bits = merged.detach().reshape(-1).view(int_view).to(wide_int)
        original_bits = _wrap(merged_bits - diff, bits).to(int_view)
        return original_bits.view(self.dtype).view(self.shape)


def _bit_difference(original: torch.Tensor, merged: torch.Tensor, int_view: torch.dtype) -> torch.Tensor:
    """merged_bits - original_bits in a wider integer type, chunk by chunk."""
    wide_int = torch.int32 if int_view == torch.int16 else torch.int64
    out = torch.empty(original.numel(), dtype=wide_int, device=original.device)
    o_bits, m_bits = original.view(int_view), merged.view(int_view)
    for start in range(0, original.numel(), _CHUNK):
        end = min(start + _CHUNK, original.numel())
        out[start:end] = m_bits[start:end].to(wide_int) - o_bits[start:end].to(wide_int)
    return out


class NonFiniteMergeError(LoracastError):
    """A safe merge would have written inf or nan into a base weight."""


def check_finite(tensor: torch.Tensor, where: str, adapters: Iterable[str]) -> None:
    """Raise `NonFiniteMergeError` naming `where` when `tensor` holds inf or nan."""
    if not torch.isfinite(tensor).all():
        names = ", ".join(adapters)
        raise NonFiniteMergeError(
            f"merging adapter(s) {names} into {where} gives non-finite values; the weights were left "
            "unchanged. Check the adapter for inf/nan (loracast doctor) or merge in a wider dtype.")
