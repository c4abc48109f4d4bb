"""The dtype policy, in one place.

Which dtype a new adapter gets, in order of precedence (first that applies wins):

1. an explicit ``adapter_dtype=`` (e.g. bf16 adapters on an fp32 base);
2. the autocast flag: with ``autocast_adapter_dtype=True`` (the default, as PEFT) an adapter
   whose dtype would be fp16, bf16 or an fp8 type is kept in float32 instead;
3. the base layer's compute dtype, for a quantized base that declares one (bitsandbytes 4-bit
   ``compute_dtype``, whatever its ``quant_storage``);
4. the base layer's storage dtype, when it is a float dtype;
5. the model's declared dtype (transformers' ``config.dtype``, formerly ``torch_dtype``), for a
   base with no float dtype of its own, such as bitsandbytes 8-bit (int8 storage);
6. otherwise torch's default dtype.

Rules 1 and 2 are PEFT's flag plus an explicit override; 3 and 4 give PEFT's dtypes on every
bitsandbytes 4-bit case (base dtype x quant_storage x compute dtype x flag). Rule 5 goes beyond
PEFT, which keeps an 8-bit base's adapters in float32 even with the flag off: here a bf16 model
loaded in 8 bits gets bf16 adapters with ``autocast_adapter_dtype=False`` (and any dtype with
``adapter_dtype=``).

The adapter lives on the device of its base weight. The same rule runs in `get_peft_model`,
`add_adapter`, `load_adapter` and `PeftModel.from_pretrained`; a loaded checkpoint's values are
copied into tensors of this dtype, so the checkpoint's own dtype never decides (as PEFT).

Forward: the LoRA branch runs in the adapter dtype (its input is cast to it) and the sum is cast
back to the base layer's output dtype. Under ``torch.autocast`` the input is not cast: autocast
decides the matmul dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from loracast.dtypes import dtype_from_name
from loracast.quant import find_backend

# Dtypes an adapter is upcast from when autocast_adapter_dtype is on (PEFT's list).
HALF_DTYPES: frozenset[torch.dtype] = frozenset(
    [torch.float16, torch.bfloat16]
    + [getattr(torch, name) for name in (
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
       if hasattr(torch, name)]
)

def base_weight(base_layer: nn.Module) -> torch.Tensor | None:
    """The tensor that carries a base layer's device and storage dtype."""
    weight = getattr(base_layer, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    qweight = getattr(base_layer, "qweight", None)
    return qweight if isinstance(qweight, torch.Tensor) else None


def base_compute_dtype(base_layer: nn.Module) -> torch.dtype | None:
    """The float dtype a base layer computes in: a quantized layer's declared compute dtype,
    else its weight's dtype when that is floating, else None."""
    backend = find_backend(base_layer)
    if backend is not None:
        declared = backend.compute_dtype(base_layer)
        if declared is not None:
            return declared
    weight = base_weight(base_layer)
    if weight is not None and weight.dtype.is_floating_point:
        return weight.dtype
    return None


def declared_dtype(model: nn.Module) -> torch.dtype | None:
    """The float dtype a model declares for its weights (transformers' ``config.dtype`` or the older
    ``config.torch_dtype``), or None when it declares none."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    # transformers >= 4.56 stores `dtype`; its `torch_dtype` is then a deprecated alias that logs
    # a warning on every read, so the old name is read only from configs that lack the new one.
    value = getattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", None)
    if isinstance(value, str):
        value = dtype_from_name(value.removeprefix("torch.").lower())
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def resolve_adapter_dtype(
    base_layer: nn.Module,
    autocast_adapter_dtype: bool = True,
    adapter_dtype: torch.dtype | None = None,
    model_dtype: torch.dtype | None = None,
) -> torch.dtype:
    """The dtype a new adapter on `base_layer` gets (precedence in the module docstring).

    `model_dtype` is the model's declared dtype (`declared_dtype`), used only for a base layer
    without a float dtype of its own.
    """
    if adapter_dtype is not None:
        return adapter_dtype
    base_dtype = base_compute_dtype(base_layer) or model_dtype or torch.get_default_dtype()
    return apply_adapter_rule(base_dtype, autocast_adapter_dtype, None)


def apply_adapter_rule(base_dtype: torch.dtype, autocast_adapter_dtype: bool = True,
                       adapter_dtype: torch.dtype | None = None) -> torch.dtype:
    """Rules 1 and 2 of the precedence on a known base dtype: an explicit `adapter_dtype`, else
    float32 for a half-precision base when autocasting, else the base dtype (used for adapters
    and for modules_to_save copies alike)."""
    if adapter_dtype is not None:
        return adapter_dtype
    if autocast_adapter_dtype and base_dtype in HALF_DTYPES:
        return torch.float32
    return base_dtype


def adapter_device(base_layer: nn.Module) -> torch.device:
    """The device a new adapter on `base_layer` is created on: its base weight's."""
    weight = base_weight(base_layer)
    if weight is not None:
        return weight.device
    for tensor in base_layer.parameters():
        return tensor.device
    return torch.device("cpu")


def autocast_active(device_type: str) -> bool:
    """True inside ``torch.autocast`` for this device type (autocast then picks matmul dtypes)."""
    return torch.is_autocast_enabled(device_type)


def cast_for_adapter(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The LoRA branch's input: `x` in the adapter dtype, unless autocast is deciding."""
    if x.dtype == dtype or not x.is_floating_point() or autocast_active(x.device.type):
        return x
    return x.to(dtype)
