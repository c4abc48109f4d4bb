"""Dtype names, in one vocabulary: the names users type, the names files record, the short names
tables show.

Users may write ``"bf16"``, ``"bfloat16"`` or ``"torch.bfloat16"`` (`parse_dtype`); fingerprints
and reports record torch's own name, ``"bfloat16"`` (`dtype_name`), which `dtype_from_name` reads
back; the doctor's tables show ``"bf16"`` (`short_dtype_name`).
"""

from __future__ import annotations

import torch

from loracast.errors import PrecisionError

# Names users write for the floating dtypes loracast computes in (torch's own names are read too).
DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}
# The short name tables show, by torch's name.
SHORT_NAMES: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """'bfloat16' for torch.bfloat16 (torch's name, as fingerprints record it); None stays None."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def dtype_from_name(name: str | None) -> torch.dtype | None:
    """The torch dtype a name stands for ('bf16', 'bfloat16', 'torch.bfloat16', 'uint8', ...), or
    None when it names none."""
    if not name:
        return None
    key = name.removeprefix("torch.")
    if key.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[key.lower()]
    dtype = getattr(torch, key, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def short_dtype_name(name: str | None) -> str:
    """'bf16' for 'bfloat16', other names unchanged; '-' for None."""
    return "-" if name is None else SHORT_NAMES.get(name, name)


def parse_dtype(value: torch.dtype | str | None, what: str = "dtype") -> torch.dtype | None:
    """A floating torch dtype from a dtype or a name such as 'bf16' or 'torch.bfloat16'; None stays None.

    Raises:
        PrecisionError: `value` names no dtype, or a dtype that is not floating.
    """
    dtype = dtype_from_name(value) if isinstance(value, str) else value
    if value is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(value, torch.dtype):
        raise PrecisionError(f"{what}={dtype_name(dtype)} is not a floating dtype; use torch.float32, torch.bfloat16 "
                             "or torch.float16")
    raise PrecisionError(f"{what}={value!r} is not a known floating dtype; use one of fp32, bf16, fp16 "
                         "(or torch.float32, torch.bfloat16, torch.float16)")
