"""An oracle for "rounded once": float64 values rounded to nearest-even in a narrower format,
computed exactly in float64 (no float32 step), subnormals included."""

import torch

_FORMATS = {  # dtype -> (significand bits, smallest normal exponent)
    torch.bfloat16: (8, -126),
    torch.float16: (11, -14),
    torch.float32: (24, -126),
}


def nearest_even(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 `values` rounded once to `dtype` (finite values within its range)."""
    bits, min_exponent = _FORMATS[dtype]
    _, exponent = torch.frexp(values)  # values = m * 2**exponent, 0.5 <= |m| < 1
    quantum = torch.ldexp(torch.ones_like(values), torch.clamp(exponent - 1, min=min_exponent) - (bits - 1))
    return (torch.round(values / quantum) * quantum).to(dtype)  # round() is half-to-even; the cast is exact
