"""optimum-quanto backend: `optimum.quanto.QLinear` layers with quantized weights only.

`optimum.quanto.quantize(model, weights=qint8)` turns each `nn.Linear` into a `QLinear` (still an
`nn.Linear`) that quantizes its float weight on every forward; `freeze(model)` then replaces the
float weight by a quantized tensor (``WeightQBytesTensor`` for qint8: int8 codes and a scale per
row; ``WeightQBitsTensor`` for qint4/qint2: codes in uint8, a scale and a shift per group). Frozen
layers are adapted here. A quanto weight reports the dtype of the float weight it replaced, and
dequantizes to it: that is the layer's compute dtype; the codes' dtype is the storage dtype.

A merge requantizes with the layer's own settings (``weight_qtype``, ``weight_group_size`` and its
optimizer), by quanto's own ``qweight`` on the merged float weight, and the layer stays frozen.
Unmerge puts the original weight parameter back, the same object: bit for bit. Refused at
`get_peft_model`, in one line: layers not frozen yet (their float weight is the trained state of
quantization-aware training, not a quantized base; a merge would have to choose between the float
and the quantized weight), and layers that also quantize activations (``activations=`` in
`quantize`: quantizing the input cuts the gradient a LoRA branch needs).

Errors raised inside quanto while merging are re-raised as `LoracastError` naming the layer and the
fix. Imported by `loracast.quant.base` only once the user has imported optimum.quanto.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from optimum.quanto import QLinear, QTensor
from torch import nn

from loracast.errors import LoracastError
from loracast.quant.base import register_backend, register_refusal


@dataclass
class SnapshotQuanto:
    """The original weight parameter of a `QLinear` (the same object, not a copy)."""

    weight: nn.Parameter

    @property
    def nbytes(self) -> int:
        """Memory the snapshot keeps alive: the codes, scales and shifts."""
        return sum(t.numel() * t.element_size() for t in vars(self.weight).values() if isinstance(t, torch.Tensor))


def _qtype_name(module: nn.Module) -> str:
    return str(module.weight_qtype.name)


class QuantoBackend:
    """A frozen `optimum.quanto.QLinear` with quantized weights and no activation qtype."""

    name = "quanto"
    # its forward needs activations in its compute dtype: prepare_model_for_kbit_training upcasts nothing
    upcast_safe = False
    # how the user gives a quanto layer the compute dtype an adapter is meant to match (the doctor's fix)
    compute_dtype_fix = ("# quanto computes in the dtype the float weights had when quantized:\n"
                         "quantize(base_model.to(torch.bfloat16), weights=qint8); freeze(base_model)  "
                         "# optimum.quanto")

    def handles(self, module: nn.Module) -> bool:
        return isinstance(module, QLinear) and isinstance(module.weight, QTensor) and module.activation_qtype is None

    def storage_dtype(self, module: nn.Module) -> torch.dtype:
        return module.weight._data.dtype

    def compute_dtype(self, module: nn.Module) -> torch.dtype | None:
        return module.weight.dtype  # a QTensor reports the float dtype it dequantizes to

    def describe(self, module: nn.Module) -> str:
        """A short label for messages, e.g. 'QLinear qint4 (48x64)'."""
        return f"QLinear {_qtype_name(module)} ({module.out_features}x{module.in_features})"

    def config_record(self, module: nn.Module) -> tuple[str, str]:
        """(the settings merges requantize with, "supplied"): the layer carries its own qtype and group size."""
        group = module.weight_group_size
        return (f"quanto(weights={_qtype_name(module)}" + (f", group_size={group}" if group else "")
                + f", optimizer={type(module.optimizer).__name__})", "supplied")

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        try:
            with torch.no_grad():
                return module.weight.dequantize()
        except Exception as exc:  # quanto's own errors, named for the layer
            raise LoracastError(f"quanto failed to dequantize {self.describe(module)}: {type(exc).__name__}: {exc}; "
                                "check that the layer was quantized by optimum.quanto.quantize") from exc

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        old = module.weight
        try:
            with torch.no_grad():
                # quanto quantizes a QLinear's float weight on reading qweight: put the merged one there
                module.weight = nn.Parameter(weight.detach().to(device=old.device, dtype=old.dtype).contiguous(),
                                             requires_grad=False)
                quantized = module.qweight  # quanto's quantizer with the layer's qtype, group size and optimizer
            module.weight = nn.Parameter(quantized, requires_grad=old.requires_grad)
        except Exception as exc:
            module.weight = old
            raise LoracastError(f"quanto failed to requantize the merged weight of {self.describe(module)}: "
                                f"{type(exc).__name__}: {exc}; keep the adapter unmerged, or merge into a float "
                                "copy of the base model") from exc

    def snapshot(self, module: nn.Module) -> SnapshotQuanto:
        return SnapshotQuanto(module.weight)

    def restore(self, module: nn.Module, state: SnapshotQuanto) -> None:
        module.weight = state.weight


register_backend(QuantoBackend())
register_refusal(
    QLinear,
    "loracast adapts frozen optimum-quanto QLinear layers with quantized weights only: call freeze(model) after "
    "quantize(model, weights=qint8/qint4/qint2), without activations= (quantized activations cut the gradient "
    "LoRA needs), or leave this module out with exclude_modules")
