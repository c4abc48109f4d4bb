"""GGUF tensor types loracast writes, and the one rounding from exact (float64) values into each.

Every value written is rounded once from the float64 merged weight: to float32, float16 or bfloat16
correctly rounded (`round_once`), or, for Q8_0, quantized from the float32 weight as llama.cpp's
own quantizer does (blocks of 32 along a row, one float16 scale each). The decoded values of what
was written give each tensor's error against the exact weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from loracast.errors import LoracastError
from loracast.layers.merge import round_once


@dataclass(frozen=True)
class GgufType:
    """A GGUF type loracast writes: its name on the command line, the GGML tensor type, the
    ``general.file_type`` of a file mostly in it, and what it is."""

    name: str
    ggml_type: str
    file_type: str
    what: str


GGUF_TYPES = (
    GgufType("f32", "F32", "ALL_F32", "float32, as is"),
    GgufType("f16", "F16", "MOSTLY_F16", "float16, each weight rounded once"),
    GgufType("bf16", "BF16", "MOSTLY_BF16", "bfloat16, each weight rounded once"),
    GgufType("q8_0", "Q8_0", "MOSTLY_Q8_0", "8-bit blocks of 32 with a float16 scale, quantized once from float32"),
)
TYPES = {t.name: t for t in GGUF_TYPES}
Q8_0_BLOCK = 32


class ExportError(LoracastError):
    """An export cannot be done as asked: the message names the input at fault and the fix."""


def check_type(name: str, offered: tuple[str, ...] = tuple(TYPES)) -> str:
    """`name` (case-insensitive) if it is one of the `offered` GGUF types.

    Raises:
        ExportError: the writer cannot produce that type.
    """
    key = str(name).strip().lower()
    if key not in offered:
        raise ExportError(f"GGUF type {name!r} is not one loracast's writer produces; choose one of "
                          f"{', '.join(offered)} (llama.cpp's llama-quantize turns an f32 or q8_0 file into the others)")
    return key


@dataclass
class Encoded:
    """A tensor ready for the GGUF writer: its data, GGML type name and the values it decodes to."""

    data: np.ndarray
    ggml_type: str  # "F32", "F16", "BF16", "Q8_0"

    def decoded(self) -> torch.Tensor:
        """The float64 values a GGUF reader gets back from this tensor."""
        if self.ggml_type == "BF16":
            return torch.from_numpy(self.data.copy()).view(torch.bfloat16).double()
        if self.ggml_type == "Q8_0":
            import gguf

            values = gguf.quants.dequantize(self.data, gguf.GGMLQuantizationType.Q8_0)
            return torch.from_numpy(np.ascontiguousarray(values)).double()
        return torch.from_numpy(self.data).double()


def planned_type(shape: tuple[int, ...], kind: str) -> str:
    """The GGML type `encode` gives a tensor of `shape` asked to be `kind`: a 1-D tensor (a norm) is
    always F32, as llama.cpp's converter writes it; Q8_0 rows that are not a multiple of 32 fall back
    to F16, as the converter's do."""
    if len(shape) <= 1:
        return "F32"
    if kind == "q8_0" and shape[-1] % Q8_0_BLOCK != 0:
        return "F16"
    return TYPES[kind].ggml_type


def encoded_nbytes(shape: tuple[int, ...], ggml_type: str) -> int:
    """The bytes a tensor of `shape` takes in GGML type `ggml_type`."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    return math.prod(shape) // block * size


def encode(values: torch.Tensor, kind: str) -> Encoded:
    """`values` (float64, or float32 for weights stored as float32) rounded once into GGUF type `kind`
    (the GGML type `planned_type` names).

    Raises:
        ExportError: a value is not finite in the target type (an overflow of float16).
    """
    values = values.detach().cpu()
    ggml_type = planned_type(tuple(values.shape), kind)
    if ggml_type == "F32":
        return Encoded(values.float().contiguous().numpy(), "F32")
    if ggml_type == "Q8_0":
        import gguf

        qtype = gguf.GGMLQuantizationType.Q8_0
        return Encoded(gguf.quants.quantize(values.float().contiguous().numpy(), qtype), "Q8_0")
    dtype = torch.bfloat16 if ggml_type == "BF16" else torch.float16
    rounded = round_once(values.double(), dtype)
    if not torch.isfinite(rounded).all():
        raise ExportError(f"a weight overflows {kind}'s range (largest |value| {float(values.abs().max()):.3g}); "
                          "export as bf16 or f32")
    bits = rounded.contiguous().view(torch.int16).numpy()
    return Encoded(bits if dtype == torch.bfloat16 else bits.view(np.float16), ggml_type)
