"""Initialisations that start LoRA from the base weight: PiSSA, OLoRA, orthogonal, LoftQ.

PiSSA (``"pissa"``, or ``"pissa_niter_K"`` for a randomised SVD with K subspace iterations) and
OLoRA (``"olora"``, a QR decomposition) move the principal part of the base weight ``W`` into
the adapter and leave the residual ``W - scaling * B @ A`` in the base. LoftQ (``"loftq"``)
does the same on a quantized base: ``A``, ``B`` are chosen so that ``Q + scaling * B @ A`` is
close to ``W`` where ``Q`` is the quantized residual. ``"orthogonal"`` draws ``A`` and ``B``
from orthogonal halves of a random rotation so that ``B @ A = 0`` (no base change).

Precision (the difference from PEFT): the decomposition runs in float64; ``A`` and ``B`` are
rounded to the adapter dtype first, and the residual is computed from those rounded factors
and rounded once into the base dtype. So the model at step 0 differs from the original only by
that one rounding of the residual, whatever the adapter dtype. PEFT computes in float32 and
rounds the factors after the residual, which with bf16 adapters leaves an error of the size
of the factors' rounding in every adapted weight.
"""

from __future__ import annotations

import re

import torch

from loracast.errors import ConfigError

WEIGHT_INITS = ("pissa", "olora", "loftq")  # and "pissa_niter_K": these rewrite the base weight
_NITER = re.compile(r"pissa_niter_(\d+)$")


def is_weight_init(init: object) -> bool:
    """True for initialisations that rewrite the base weight (PiSSA in both forms, OLoRA, LoftQ)."""
    return isinstance(init, str) and (init in WEIGHT_INITS or _NITER.match(init) is not None)


def decompose(weight: torch.Tensor, init: str, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in float64 for PiSSA or OLoRA on `weight` (out, in), such that ``scaling * B @ A``
    is the part of the weight the adapter takes over."""
    w = weight.to(torch.float64)
    if init == "olora":
        q, upper = torch.linalg.qr(w)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    niter = _NITER.match(init)
    if niter is not None:
        u, s, v = torch.svd_lowrank(w, q=r, niter=int(niter.group(1)))
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    return (root[:, None] * vh[:r]).contiguous(), (u[:, :r] * root[None, :]).contiguous()


def residual(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W - scaling * B @ A`` in float64, from the factors as they are stored (already rounded)."""
    return weight.to(torch.float64) - scaling * (lora_b.to(torch.float64) @ lora_a.to(torch.float64))


def orthogonal_factors(r: int, in_features: int, out_features: int, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in float32 with ``B @ A = 0`` (PEFT's draw: A and B from the odd and even rows of a random
    orthogonal matrix, scaled by 1/10).

    Raises:
        ConfigError: `r` is odd.
    """
    if r % 2:
        raise ConfigError("r", r, "an even rank for init_lora_weights='orthogonal'")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    lora_a = torch.randn(in_features, r // 2).mm(q[0::2, :]).T / 10.0
    lora_b = torch.randn(r // 2, out_features).T.mm(q[1::2, :]) / 10.0
    return lora_a.contiguous().to(device), lora_b.contiguous().to(device)
