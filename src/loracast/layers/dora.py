"""DoRA: weight-decomposed LoRA (Liu et al. 2024), with PEFT's names, shapes and arithmetic.

A DoRA adapter adds a learned magnitude `m` (one value per output row of the weight) to the LoRA
factors; the adapted weight is ``m * (W + s*B@A) / ||W + s*B@A||``, the norm taken per output
row and treated as a constant in backward (the paper's section 4.3). The layer's output is
``base(x) + (m/n - 1) * (base(x) - bias) + (m/n) * s * B(A(x))`` with ``n = ||W + s*B@A||``.

One `LoraVariant` per layer kind (`DoraLinear`, `DoraConv`, `DoraEmbedding`) says how that
kind's weight reads as rows and how its output is rearranged; the norm, its cache and the merge
are shared (`Dora`).

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

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from loracast.layers.base import LoraLayer, delta_dtype
from loracast.layers.conv import Conv
from loracast.layers.embedding import Embedding
from loracast.layers.fastpath import global_hooks, plain_factor
from loracast.layers.linear import Linear
from loracast.layers.merge import round_once
from loracast.layers.variant import LoraVariant
from loracast.precision.rules import cast_for_adapter
from loracast.quant.base import stored_weight


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


class Dora(LoraVariant):
    """DoRA for one adapter: the magnitude it owns, the weight norm (cached), the merge.

    Subclasses say how their layer kind's weight and factors read as (out, in) rows and how the
    output is rearranged (`forward`). An instance serves one adapter of one layer and keeps that
    adapter's cached norms.
    """

    title: ClassVar[str] = "DoRA"
    containers: ClassVar[tuple[str, ...]] = ("lora_magnitude_vector",)
    flag: ClassVar[str | None] = "use_dora"
    plain: ClassVar[bool] = False
    per_sample: ClassVar[bool] = False  # as in PEFT

    def __init__(self) -> None:
        self._base_sq: tuple[Any, torch.Tensor] | None = None  # (key of the base weight, ||W_i||^2)
        self._norm: tuple[Any, torch.Tensor] | None = None     # (key of factors and base, ||W + s*B@A||)

    # -- what a layer kind provides (defaults: a weight stored as (out, in), factors as modules) ---

    def base_weight(self, layer: LoraLayer) -> torch.Tensor:
        """The base weight as a float tensor, in the base layout."""
        return layer.get_base_layer().weight.detach()

    def base_source(self, layer: LoraLayer) -> torch.Tensor:
        """The tensor that holds the base weight as stored: the norm caches are keyed on it."""
        return layer.get_base_layer().weight

    def rows(self, layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
        """A (out, in) view of a base-layout tensor: one row per magnitude entry."""
        return weight

    def factor_rows(self, layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's factors as A (r, in) and B (out, r)."""
        return layer.lora_A[adapter_name].weight.flatten(1), layer.lora_B[adapter_name].weight.flatten(1)

    def magnitude_shape(self, layer: LoraLayer) -> tuple[int, ...]:
        """The magnitude's shape (PEFT's)."""
        return (layer.out_features,)

    def norm_delta(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """The update whose sum with the base weight the norm is taken of, base layout."""
        return layer.get_delta_weight(adapter_name)

    # -- the norm -------------------------------------------------------------------------------

    def base_row_sq_norms(self, layer: LoraLayer) -> torch.Tensor:
        """``||W_i||^2`` per output row of the (dequantized) base weight, in float64, cached
        until the base weight tensor changes (another tensor, an in-place write, a move)."""
        source = self.base_source(layer)
        key = (id(source), _cache_key(source))
        if self._base_sq is not None and key[1] is not None and self._base_sq[0] == key:
            return self._base_sq[1]
        with torch.no_grad():
            sq = self.rows(layer, self.base_weight(layer)).to(torch.float64).square().sum(dim=1)
        self._base_sq = (key, sq)
        return sq

    def weight_norm(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """``||W + s*B@A||`` per output row, in float32 (float64 for float64 adapters), without
        gradient; reused until a factor, the scaling or the base weight changes."""
        a, b = self.factor_rows(layer, adapter_name)
        scaling = layer.scaling[adapter_name]
        # An optimizer step writes the factors in place, bumping their versions: between steps, in
        # evaluation, in generation and in checkpointed recomputation the norm is reused.
        source = self.base_source(layer)
        key = (_cache_key(a), _cache_key(b), scaling, id(source), _cache_key(source))
        if self._norm is not None and None not in key and self._norm[0] == key:
            return self._norm[1]
        dtype = torch.promote_types(a.dtype, torch.float32)
        with torch.no_grad():
            norm = self.fresh_norm(layer, adapter_name, a.detach().to(dtype), b.detach().to(dtype), scaling)
        self._norm = (key, norm)
        return norm

    def fresh_norm(self, layer: LoraLayer, adapter_name: str, a: torch.Tensor, b: torch.Tensor,
                   scaling: float) -> torch.Tensor:
        """The norm from the cached ``||W_i||^2`` and the low-rank terms (see the module
        docstring), in the dtype of `a` (r, in) and `b` (out, r)."""
        rows = self.rows(layer, self.base_weight(layer))            # (out, in)
        wa = rows.to(a.dtype) @ a.T                                 # (out, r)
        cross = (b * wa).sum(dim=1)                                 # B_i . (W A^T)_i
        quad = ((b @ (a @ a.T)) * b).sum(dim=1)                     # B_i (A A^T) B_i^T
        sq = self.base_row_sq_norms(layer).to(wa.device) + (2 * scaling * cross + scaling * scaling * quad)
        return sq.clamp_min(0).sqrt().to(a.dtype)

    def direct_weight_norm(self, layer: LoraLayer, adapter_name: str,
                           dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``||W + delta||`` per output row, the matrix built explicitly in `dtype` (the reference;
        used once per adapter, to initialise the magnitude)."""
        with torch.no_grad():
            weight = self.base_weight(layer).to(dtype) + self.norm_delta(layer, adapter_name).to(dtype)
            return self.rows(layer, weight).norm(dim=1)

    def scale(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """``m / ||W + s*B@A||`` as a flat (out,) tensor; the gradient flows to `m` only."""
        magnitude = layer.lora_magnitude_vector[adapter_name].weight
        return magnitude.reshape(-1) / self.weight_norm(layer, adapter_name)

    # -- the variant interface ------------------------------------------------------------------

    def create(self, layer: LoraLayer, adapter_name: str, *, dtype: torch.dtype, device: torch.device,
               initialize: bool) -> None:
        """Give the adapter a magnitude in `dtype` on `device`: the exact norm of its initial
        adapted weight (computed in float64, rounded once), or left uninitialised when it is about
        to be loaded (`initialize` False)."""
        shape = self.magnitude_shape(layer)
        if initialize and device.type != "meta":
            norm = self.direct_weight_norm(layer, adapter_name)
            weight = round_once(norm.reshape(shape), dtype).to(device)
        else:
            weight = torch.empty(shape, dtype=dtype, device=device)
        layer.lora_magnitude_vector[adapter_name] = DoraMagnitude(weight)

    def merge(self, layer: LoraLayer, adapter_name: str, original: torch.Tensor, delta: torch.Tensor,
              current: torch.Tensor) -> None:
        """Add the delta, then rescale every row by ``m / ||W0 + delta||`` (the norm of the
        unmerged base plus this adapter's own delta, as PEFT), all in float64."""
        current += delta
        norm = self.rows(layer, original + delta).norm(dim=1)
        factor = layer.lora_magnitude_vector[adapter_name].weight.detach().reshape(-1).to(torch.float64) / norm
        self.rows(layer, current).mul_(factor[:, None])  # a view of `current`: scaled in place


class DoraLinear(Dora):
    """DoRA on a `Linear` (also GPT-2's Conv1D, stored (in, out), and quantized bases, read
    through their backend)."""

    def base_weight(self, layer: Linear) -> torch.Tensor:
        if layer.quant_backend is None:
            return layer.base_layer.weight.detach()
        return layer.quant_backend.dequantize(layer.base_layer)

    def base_source(self, layer: Linear) -> torch.Tensor:
        # an HQQ layer has no `weight`: its backend names the tensor its packed codes live in
        return stored_weight(layer.quant_backend, layer.base_layer)

    def rows(self, layer: Linear, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if layer.fan_in_fan_out else weight

    def forward(self, layer: Linear, x: torch.Tensor, adapter_name: str, result: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        x = cast_for_adapter(x, lora_a.weight.dtype)
        dropout = layer.lora_dropout[adapter_name]
        scaling = layer.scaling[adapter_name]
        factor = self.scale(layer, adapter_name)  # (out,), broadcast over the last dim
        if isinstance(dropout, nn.Identity) or not layer.training:
            bias = getattr(layer.base_layer, "bias", None)
            h = lora_a(x)
            if plain_factor(lora_b) and not global_hooks() and h.dtype == lora_b.weight.dtype == factor.dtype:
                return folded_linear_output(result, h, lora_b.weight, factor, scaling, bias)
            return combine(result, lora_b(h), factor, scaling, bias)
        # PEFT's semantics with dropout: the rescaled base part W x sees the dropped-out input too
        x = dropout(x)
        base_result = F.linear(x, self.rows(layer, self.base_weight(layer).to(x.dtype)))
        return result + (factor - 1) * base_result + factor * lora_b(lora_a(x)) * scaling


class DoraConv(Dora):
    """DoRA on a `Conv`: one magnitude per output channel, shaped (1, out, 1, ...) as PEFT's.

    On a grouped convolution (``groups > 1``) the LoRA branch is PEFT's: ``lora_A`` sees every
    input channel and ``lora_B`` is grouped, so the update connects every input channel to every
    output channel while the base weight holds only the in-group connections. The norm is then
    PEFT's too: of the base weight plus the product ``B @ A`` with B read as (out/groups, r) and
    laid out in the base weight's shape (what PEFT 0.21.2 computes, and what its files' magnitudes
    were trained against), built explicitly; such an adapter cannot be merged.
    """

    def rows(self, layer: Conv, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)

    def magnitude_shape(self, layer: Conv) -> tuple[int, ...]:
        return (1, layer.out_features) + (1,) * (layer.base_layer.weight.dim() - 2)

    def norm_delta(self, layer: Conv, adapter_name: str) -> torch.Tensor:
        base = layer.base_layer
        if base.groups == 1:
            return layer.get_delta_weight(adapter_name)
        weight_a = layer.lora_A[adapter_name].weight  # (r, in, *kernel)
        weight_b = layer.lora_B[adapter_name].weight  # (out, r / groups, 1, ...)
        r, dtype = weight_a.shape[0], delta_dtype(weight_a)
        product = weight_b.to(dtype).reshape(-1, r) @ weight_a.to(dtype).reshape(r, -1)  # (out / groups, in * k)
        return product.reshape(base.weight.shape) * layer.scaling[adapter_name]

    def fresh_norm(self, layer: Conv, adapter_name: str, a: torch.Tensor, b: torch.Tensor,
                   scaling: float) -> torch.Tensor:
        if layer.base_layer.groups == 1:
            return super().fresh_norm(layer, adapter_name, a, b, scaling)
        # the grouped layout has no row-wise low-rank form; conv weights are small: build it
        return self.direct_weight_norm(layer, adapter_name).to(a.dtype)

    def forward(self, layer: Conv, x: torch.Tensor, adapter_name: str, result: torch.Tensor) -> torch.Tensor:
        base = layer.base_layer
        channel_view = (1, -1) + (1,) * (result.dim() - 2)
        lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        x = cast_for_adapter(x, lora_a.weight.dtype)
        dropout = layer.lora_dropout[adapter_name]
        scaling = layer.scaling[adapter_name]
        factor = self.scale(layer, adapter_name).view(channel_view)
        if isinstance(dropout, nn.Identity) or not layer.training:
            bias = None if base.bias is None else base.bias.view(channel_view)
            return combine(result, lora_b(lora_a(x)), factor, scaling, bias)
        # PEFT's semantics with dropout: the rescaled base part W x sees the dropped-out input too
        x = dropout(x)
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[base.weight.dim()]
        base_result = conv(x, base.weight.to(x.dtype), None, base.stride, base.padding, base.dilation, base.groups)
        return result + (factor - 1) * base_result + factor * lora_b(lora_a(x)) * scaling


class DoraEmbedding(Dora):
    """DoRA on an `Embedding`: one magnitude per embedding dimension (a column of the table)."""

    def rows(self, layer: Embedding, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    def factor_rows(self, layer: Embedding, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]

    def forward(self, layer: Embedding, x: torch.Tensor, adapter_name: str, result: torch.Tensor) -> torch.Tensor:
        factor = self.scale(layer, adapter_name)  # (embedding_dim,)
        update = factor * layer.low_rank_rows(x, adapter_name) * layer.scaling[adapter_name]
        # embed_scale applies to the DoRA term only: the base output already carries it (as PEFT)
        return factor * result + layer.embed_scaled(update)


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
