"""DoRA: weight-decomposed LoRA (Liu et al. 2024), with PEFT's names, shapes and arithmetic.

A DoRA adapter adds a learned magnitude `m` (one value per output row of the weight) to the LoRA
factors; the adapted weight is ``m * (W + s*B@A) / ||W + s*B@A||``, the norm taken per output
row and treated as a constant in backward (the paper's section 4.3). The layer's output is
``base(x) + (m/n - 1) * (base(x) - bias) + (m/n) * s * B(A(x))`` with ``n = ||W + s*B@A||``.

Names and shapes follow PEFT: the magnitude is ``lora_magnitude_vector[adapter].weight`` (a
module, so FSDP can wrap it), of shape ``(out,)`` for Linear and Embedding (an embedding's
"rows" are its `embedding_dim` columns) and ``(1, out, 1, ...)`` for convolutions; its file key
drops the ``.weight`` (``...lora_magnitude_vector``).

Two things differ from PEFT, both on purpose:

* The norm is computed in float32 or wider, whatever the base and adapter dtypes (PEFT computes
  it in the activation dtype, so a bf16 adapter gets a bf16 norm and a bf16 base a magnitude
  rounded to bf16 at creation).
* The norm is not rebuilt from ``W + s*B@A`` in every forward. Per row i,
  ``n_i^2 = ||W_i||^2 + 2s * B_i . (W A^T)_i + s^2 * B_i (A A^T) B_i^T``: the first term is
  constant while training (the base is frozen) and cached, the others need one (out, in) x
  (in, r) product and r x r algebra, instead of materialising and reducing an (out, in) matrix
  (PEFT also builds B@A by pushing an (in, in) identity through both factors).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loracast.layers.merge import round_once


class DoraMagnitude(nn.Module):
    """Holds one DoRA adapter's magnitude vector as ``.weight`` (PEFT's `DoraLinearLayer` layout)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def _cache_key(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """What identifies a tensor's current values: its storage, its version (bumped by every
    in-place write, shared with its views), shape and device; None for an inference-mode tensor,
    which has no version counter (nothing computed from it is reused)."""
    if tensor.is_inference():
        return None
    return (tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.device)


def base_row_sq_norms(layer: Any) -> torch.Tensor:
    """``||W_i||^2`` per output row of the (dequantized) base weight, in float64, cached on the
    layer until the base weight tensor changes (another tensor, an in-place write, a move)."""
    source = layer._dora_weight_source()
    key = (id(source), _cache_key(source))
    cached = layer.__dict__.get("_dora_base_sq")
    if cached is not None and key[1] is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        rows = layer._dora_weight_rows(layer._dora_base_weight())
        sq = rows.to(torch.float64).square().sum(dim=1)
    layer.__dict__["_dora_base_sq"] = (key, sq)
    return sq


def weight_norm(layer: Any, adapter_name: str) -> torch.Tensor:
    """``||W + s*B@A||`` per output row, in float32 (float64 for float64 adapters), without gradient.

    Computed from the cached ``||W_i||^2`` and the low-rank terms (see the module docstring).
    """
    a, b = layer._dora_factor_rows(adapter_name)  # (r, in), (out, r)
    scaling = layer.scaling[adapter_name]
    # The norm changes only when a factor, the scaling or the base weight does (an optimizer step
    # writes the factors in place, bumping their versions): between steps, in evaluation, in
    # generation and in checkpointed recomputation it is reused.
    source = layer._dora_weight_source()
    key = (_cache_key(a), _cache_key(b), scaling, id(source), _cache_key(source))
    norms = layer.__dict__.setdefault("_dora_norms", {})
    cached = norms.get(adapter_name)
    if cached is not None and None not in key and cached[0] == key:
        return cached[1]
    dtype = torch.promote_types(a.dtype, torch.float32)
    with torch.no_grad():
        a = a.detach().to(dtype)
        b = b.detach().to(dtype)
        rows = layer._dora_weight_rows(layer._dora_base_weight())  # (out, in)
        wa = rows.to(dtype) @ a.T                                   # (out, r)
        cross = (b * wa).sum(dim=1)                                 # B_i . (W A^T)_i
        quad = ((b @ (a @ a.T)) * b).sum(dim=1)                     # B_i (A A^T) B_i^T
        sq = base_row_sq_norms(layer).to(wa.device) + (2 * scaling * cross + scaling * scaling * quad)
        norm = sq.clamp_min(0).sqrt().to(dtype)
    norms[adapter_name] = (key, norm)
    return norm


def direct_weight_norm(layer: Any, adapter_name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``||W + delta||`` per output row, the matrix built explicitly in `dtype` (the reference;
    used once per adapter, to initialise the magnitude and to merge)."""
    with torch.no_grad():
        weight = layer._dora_base_weight().to(dtype) + layer.get_delta_weight(adapter_name).to(dtype)
        return layer._dora_weight_rows(weight).norm(dim=1)


def add_magnitude(layer: Any, adapter_name: str, dtype: torch.dtype, device: torch.device,
                  initialize: bool) -> None:
    """Give `layer`'s adapter `adapter_name` a DoRA magnitude in `dtype` on `device`: the exact
    norm of its initial adapted weight (computed in float64, rounded once), or left
    uninitialised when it is about to be loaded (`initialize` False)."""
    shape = layer._dora_magnitude_shape()
    if initialize and device.type != "meta":
        norm = direct_weight_norm(layer, adapter_name)
        weight = round_once(norm.reshape(shape), dtype).to(device)
    else:
        weight = torch.empty(shape, dtype=dtype, device=device)
    if "lora_magnitude_vector" not in layer._modules:
        layer._modules["lora_magnitude_vector"] = nn.ModuleDict()
        # an instance-level tuple, so generic loops (grad, deletion, saving) see the magnitude
        layer.__dict__["adapter_layer_names"] = type(layer).adapter_layer_names + ("lora_magnitude_vector",)
    layer.lora_magnitude_vector[adapter_name] = DoraMagnitude(weight)
    layer.use_dora[adapter_name] = True
    layer.__dict__.get("_dora_norms", {}).pop(adapter_name, None)  # new factors: never reuse a norm


def scale(layer: Any, adapter_name: str) -> torch.Tensor:
    """``m / ||W + s*B@A||`` as a flat (out,) tensor; the gradient flows to `m` only."""
    magnitude = layer.lora_magnitude_vector[adapter_name].weight
    return magnitude.reshape(-1) / weight_norm(layer, adapter_name)


def merged_weight(layer: Any, original: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The base weight with adapters `names` merged in order, computed in float64 and rounded
    once to ``original.dtype``: a LoRA adapter adds its delta, a DoRA adapter then rescales every
    row by ``m / ||W0 + delta||`` (the norm of the unmerged base plus its own delta, as PEFT)."""
    w0 = original.detach().to(torch.float64)
    current = w0.clone()
    for name in names:
        delta = layer.get_delta_weight(name).to(device=w0.device, dtype=torch.float64)
        current += delta
        if layer.use_dora.get(name):
            norm = layer._dora_weight_rows(w0 + delta).norm(dim=1)
            factor = layer.lora_magnitude_vector[name].weight.detach().reshape(-1).to(torch.float64) / norm
            layer._dora_weight_rows(current).mul_(factor[:, None])  # a view of `current`: scaled in place
    return round_once(current, original.dtype)


def combine(result: torch.Tensor, lora: torch.Tensor, factor: torch.Tensor, scaling: float,
            bias: torch.Tensor | None) -> torch.Tensor:
    """PEFT's ``result + (f - 1) * (result - bias) + f * lora * s``, rearranged into fewer passes
    over the (tokens, out) tensors: ``f * (result + s * lora) - (f - 1) * bias`` (the same value
    and the same gradients; `result` is the output so far, `lora` is ``B(A(x))``)."""
    out = torch.add(result, lora, alpha=scaling) * factor
    if bias is not None:
        out = out - (factor - 1) * bias
    return out


def folded_linear_output(result: torch.Tensor, h: torch.Tensor, weight_b: torch.Tensor, factor: torch.Tensor,
                         scaling: float, bias: torch.Tensor | None) -> torch.Tensor:
    """`combine` for a Linear whose ``lora_B`` weight can be read directly, in one matmul and one
    fused multiply-add over the (tokens, out) tensors: ``f * s`` is folded into the rows of B
    (an (out, r) product) and ``(1 - f) * bias`` into the matmul's bias, then
    ``out = (h @ (f*s*B).T + (1 - f) * bias) + f * result``. `h` is ``A(x)``; all of `h`,
    `weight_b` and `factor` share one dtype."""
    folded_b = weight_b * (factor * scaling).unsqueeze(1)        # (out, r)
    folded_bias = None if bias is None else (1 - factor) * bias  # (out,)
    return RescaleAdd.apply(F.linear(h, folded_b, folded_bias), result, factor)


class RescaleAdd(torch.autograd.Function):
    """``z + f * result`` (f broadcast over the last dim), with a backward that makes one pass
    over the (tokens, out) tensors per gradient it is asked for (autograd's addcmul backward
    also multiplies by its scalar weight and copies)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, result: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(result, factor)
        return torch.addcmul(z, result, factor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        result, factor = ctx.saved_tensors
        grad_z = grad if ctx.needs_input_grad[0] else None
        grad_result = (grad * factor).to(result.dtype) if ctx.needs_input_grad[1] else None
        grad_factor = None
        if ctx.needs_input_grad[2]:  # sum over every leading (token) dim: (out,)
            grad_factor = (grad * result).reshape(-1, factor.shape[-1]).sum(0).to(factor.dtype)
        return grad_z, grad_result, grad_factor
