"""LoftQ: LoRA factors chosen so that the quantized base plus the adapter is close to the float weight.

PEFT's algorithm (`loftq_config={"loftq_bits": 4 or 8, "loftq_iter": n}`), alternating n times:
quantize the part of ``W`` the adapter does not hold (bitsandbytes NF4 with blocks of 64, or
int8 per row), then fit the adapter to what quantization lost by a truncated SVD. Here the SVD
and every difference run in float64 (PEFT: float32, and on a CUDA/XPU device only), and the
factors carry ``1 / scaling`` so that ``Q + scaling * B @ A`` approximates ``W`` for any
lora_alpha (PEFT fits ``B @ A`` without the scaling, exact only when lora_alpha == r).
"""

from __future__ import annotations

import torch

from loracast.errors import ConfigError


def _settings(config: dict) -> tuple[int, int]:
    bits = config.get("loftq_bits", 4)
    iters = config.get("loftq_iter", 1)
    if bits not in (4, 8):
        raise ConfigError("loftq_config['loftq_bits']", bits, "4 (NF4) or 8 (int8)")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ConfigError("loftq_config['loftq_iter']", iters, "a positive integer")
    return bits, iters


def quantize_roundtrip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """`weight` quantized as bitsandbytes stores it (NF4, blocksize 64, or int8 per row), then
    dequantized: float32, the values a quantized base would compute with."""
    import bitsandbytes.functional as bnbf

    w = weight.to(torch.float32).contiguous()
    if bits == 4:
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        return bnbf.dequantize_4bit(packed, state).to(torch.float32)
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    return torch.round(w / scale).clamp(-127, 127) * scale


def loftq(weight: torch.Tensor, r: int, scaling: float, config: dict
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, Q): float64 factors and the dequantized base (float32) for `weight` (out, in), with
    ``Q + scaling * B @ A`` close to `weight`.

    Raises:
        ConfigError: loftq_config holds unsupported bits or iterations.
    """
    bits, iters = _settings(config)
    w = weight.to(torch.float64)
    rest = w
    for step in range(iters):
        quantized = quantize_roundtrip(rest, bits)
        u, s, vh = torch.linalg.svd(w - quantized.to(torch.float64), full_matrices=False)
        root = torch.sqrt(s[:r] / scaling)
        lora_a, lora_b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
        if step + 1 < iters:
            rest = w - scaling * (lora_b @ lora_a)
    return lora_a.contiguous(), lora_b.contiguous(), quantized
