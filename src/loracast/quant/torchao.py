"""torchao backends: linear layers whose weight `torchao.quantization.quantize_` replaced.

torchao keeps the `nn.Linear` and swaps its weight for a tensor subclass; two of them run on a
CPU and are adapted here:

* `Int8Tensor` (``Int8WeightOnlyConfig``): int8 codes, one float scale per row (or group);
* `IntxUnpackedToInt8Tensor` (``IntxWeightOnlyConfig(weight_dtype=torch.int4,
  granularity=PerGroup(32))`` and the other 1-8 bit widths): the codes kept one per int8, a
  scale and zero point per group.

Both report the dtype of the float weight they replaced as their own ``dtype``, and
``dequantize()`` returns that dtype: it is the layer's compute dtype (the adapter dtype with
``autocast_adapter_dtype=False``); the int8 codes are the storage dtype. Other torchao weights
(int4 tile-packed ``Int4Tensor`` of ``Int4WeightOnlyConfig``, float8, activation-quantized
variants) are refused at `get_peft_model` with the reason (`loracast.quant.base.check_adaptable`).

A merge requantizes with the layer's own torchao config: the one `quantize_base` used (recorded
on the layer), or else one read back from the weight (`layer_config`), recorded on the layer
the first time it is needed so that every later merge uses the same one. The quantizing runs
through `quantize_` on a scratch `nn.Linear`, so the user's layer only ever sees its weight
replaced, and never with ``set_inductor_config`` on (that would change torch.compile's global
settings). Unmerge puts the original weight parameter back, the same object: bit for bit.

Imported by `loracast.quant.base` only once the user has imported torchao.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torchao.quantization import (
    Int8Tensor,
    Int8WeightOnlyConfig,
    IntxUnpackedToInt8Tensor,
    IntxWeightOnlyConfig,
    MappingType,
    PerAxis,
    PerGroup,
    PerRow,
    PerTensor,
    quantize_,
)
from torchao.utils import TorchAOBaseTensor

from loracast.errors import ConfigError, LoracastError
from loracast.quant.base import register_backend, register_refusal

CONFIG_ATTR = "loracast_torchao_config"  # a `RecordedConfig` on each torchao layer loracast merges into


@dataclass(frozen=True)
class RecordedConfig:
    """The torchao config a layer is requantized with, and where it came from."""

    config: Any  # a torchao AOBaseConfig
    source: Literal["supplied", "inferred"]  # given by quantize_base / the user, or read back from the weight

    def describe(self) -> str:
        """E.g. 'Int8WeightOnlyConfig(granularity=PerRow(dim=-1))': the fields that decide the grid."""
        fields = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)
                  if f.name in ("weight_dtype", "granularity", "mapping_type")}
        shown = ", ".join(f"{k}={_short(v)}" for k, v in fields.items())
        return f"{type(self.config).__name__}({shown})"


def _short(value: Any) -> str:
    return str(value).removeprefix("torch.").removeprefix("MappingType.")


def record_config(module: nn.Module, config: Any) -> None:
    """Tell loracast which torchao `config` quantized `module`; merges requantize with it.

    Call it after quantizing a layer yourself when the config is not one loracast can read
    back from the weight (`layer_config` says which it reads); `quantize_base` calls it for you.
    """
    setattr(module, CONFIG_ATTR, RecordedConfig(config, "supplied"))


def layer_config(module: nn.Module) -> RecordedConfig:
    """The config `module` is requantized with: the recorded one, else one read from its weight
    (int8 weight-only: its granularity; intx weight-only: bit width, group size, symmetric or
    not, scale dtype), which is then recorded.

    Raises:
        LoracastError: the weight carries activation quantization or a layout this backend
            does not requantize.
    """
    recorded = getattr(module, CONFIG_ATTR, None)
    if isinstance(recorded, RecordedConfig):
        return recorded
    recorded = RecordedConfig(_infer_config(module.weight), "inferred")
    setattr(module, CONFIG_ATTR, recorded)
    return recorded


def _granularity(block_size: Any, shape: torch.Size) -> Any:
    rows, cols = int(block_size[0]), int(block_size[1])
    if (rows, cols) == (1, shape[1]):
        return PerRow()
    if (rows, cols) == tuple(shape):
        return PerTensor()
    return PerGroup(cols)


def _infer_config(weight: torch.Tensor) -> Any:
    if isinstance(weight, Int8Tensor) and weight.act_quant_kwargs is None:
        return Int8WeightOnlyConfig(granularity=_granularity(weight.block_size, weight.shape),
                                    set_inductor_config=False)
    if isinstance(weight, IntxUnpackedToInt8Tensor) and weight.activation_quantization is None:
        granularity = _granularity(weight.block_size, weight.shape)
        symmetric = not bool(weight.zero_point.any())
        return IntxWeightOnlyConfig(
            weight_dtype=weight.target_dtype,
            granularity=PerAxis(0) if isinstance(granularity, PerRow) else granularity,
            mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC,
            scale_dtype=weight.scale.dtype)
    raise LoracastError(f"cannot requantize a torchao {type(weight).__name__} weight with activation quantization: "
                        "loracast merges into weight-only int8/intx layers only; keep the adapter unmerged")


def _without_global_effects(config: Any) -> Any:
    if getattr(config, "set_inductor_config", False):
        return dataclasses.replace(config, set_inductor_config=False)
    return config


def _quantized_weight(weight: torch.Tensor, config: Any) -> nn.Parameter:
    """`weight` (out, in) quantized by torchao with `config`, as the parameter quantize_ makes."""
    scratch = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    scratch.weight = nn.Parameter(weight, requires_grad=False)
    quantize_(scratch, _without_global_effects(config))
    return scratch.weight


@dataclass
class SnapshotTorchao:
    """The original weight parameter of a torchao layer (the same object, not a copy)."""

    weight: nn.Parameter

    @property
    def nbytes(self) -> int:
        """Memory the snapshot keeps alive: the codes, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in vars(self.weight).values() if isinstance(t, torch.Tensor))


class _TorchaoBackend:
    """What the two torchao backends share; `tensor_type` says which weights each claims."""

    name: str
    tensor_type: type

    def handles(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "weight", None), self.tensor_type)

    def storage_dtype(self, module: nn.Module) -> torch.dtype:
        return module.weight.qdata.dtype

    def compute_dtype(self, module: nn.Module) -> torch.dtype | None:
        return module.weight.dtype  # the dtype of the float weight torchao replaced; dequantize() returns it

    def bits(self, module: nn.Module) -> str:
        raise NotImplementedError

    def describe(self, module: nn.Module) -> str:
        """A short label for messages, e.g. 'torchao Int8Tensor int8 (64x32)'."""
        rows, cols = module.weight.shape
        return f"torchao {type(module.weight).__name__} {self.bits(module)} ({rows}x{cols})"

    def config_record(self, module: nn.Module) -> tuple[str, str]:
        """(the config merges requantize with, "supplied" or "inferred"), for the doctor and the
        fingerprint; read without recording anything on the layer."""
        recorded = getattr(module, CONFIG_ATTR, None)
        if not isinstance(recorded, RecordedConfig):
            recorded = RecordedConfig(_infer_config(module.weight), "inferred")
        return recorded.describe(), recorded.source

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.dequantize()

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        old = module.weight
        config = layer_config(module).config
        module.weight = _quantized_weight(weight.detach().to(device=old.device, dtype=old.dtype).contiguous(), config)

    def snapshot(self, module: nn.Module) -> SnapshotTorchao:
        return SnapshotTorchao(module.weight)

    def restore(self, module: nn.Module, state: SnapshotTorchao) -> None:
        module.weight = state.weight


class TorchaoInt8Backend(_TorchaoBackend):
    """torchao `Int8Tensor` weights without activation quantization (``Int8WeightOnlyConfig``)."""

    name = "torchao-int8"
    tensor_type = Int8Tensor

    def handles(self, module: nn.Module) -> bool:
        return super().handles(module) and module.weight.act_quant_kwargs is None

    def bits(self, module: nn.Module) -> str:
        return "int8"


class TorchaoIntxBackend(_TorchaoBackend):
    """torchao `IntxUnpackedToInt8Tensor` weights without activation quantization
    (``IntxWeightOnlyConfig``, 1 to 8 bits)."""

    name = "torchao-intx"
    tensor_type = IntxUnpackedToInt8Tensor

    def handles(self, module: nn.Module) -> bool:
        return super().handles(module) and module.weight.activation_quantization is None

    def bits(self, module: nn.Module) -> str:
        width = str(module.weight.target_dtype).removeprefix("torch.")
        group = int(module.weight.block_size[-1])
        return width if group == module.weight.shape[1] else f"{width} group {group}"


# -- quantizing a model --------------------------------------------------------------------------

QuantKind = Literal["int8", "int4"]


def torchao_config(kind: QuantKind, group_size: int = 32) -> Any:
    """The torchao config loracast uses for `kind`: int8 weight-only per row, or int4 weight-only
    per group of `group_size` (symmetric), both of which run on a CPU.

    Raises:
        ConfigError: an unknown kind (int4 tile-packed and float8 weights need a GPU kernel library,
            and loracast does not adapt them).
    """
    if kind == "int8":
        return Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)
    if kind == "int4":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    raise ConfigError("quantize", kind, "'int8' (Int8WeightOnlyConfig) or 'int4' (IntxWeightOnlyConfig(weight_dtype="
                      "torch.int4, granularity=PerGroup(32))); torchao's Int4WeightOnlyConfig and float8 configs "
                      "need a GPU kernel library and loracast does not adapt their weights")


def _default_filter(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return lambda module, name: isinstance(module, nn.Linear) and module is not head


def quantize_base(model: nn.Module, kind: QuantKind, *, group_size: int = 32,
                  filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Quantize the linear layers of `model` with torchao, in place, and record each layer's config.

    `kind` is ``"int8"`` or ``"int4"`` (`torchao_config`). By default every `nn.Linear` but the
    output head (``get_output_embeddings()``) is quantized; `filter_fn(module, name)` chooses
    otherwise. Apply it before `get_peft_model`. Returns `model`.

    Raises:
        ConfigError: an unknown kind, or a group size that does not divide a layer's input size.
    """
    config = torchao_config(kind, group_size)
    accept = filter_fn or _default_filter(model)
    chosen = [(name, module) for name, module in model.named_modules() if accept(module, name)]
    if kind == "int4":
        for name, module in chosen:
            if module.in_features % group_size:
                raise ConfigError("group_size", group_size, f"a divisor of every quantized layer's input size; "
                                  f"{name!r} has {module.in_features} inputs (or leave it out with filter_fn)")
    for _, module in chosen:
        quantize_(module, config, filter_fn=lambda m, _name: True)
        record_config(module, config)
    return model


register_backend(TorchaoInt8Backend())
register_backend(TorchaoIntxBackend())
register_refusal(
    TorchAOBaseTensor,
    "loracast adapts torchao's Int8Tensor (Int8WeightOnlyConfig) and IntxUnpackedToInt8Tensor (IntxWeightOnlyConfig) "
    "weights; Int4WeightOnlyConfig weights need a GPU kernel library, and neither they nor float8 or "
    "activation-quantized weights are adapted: quantize with loracast.quant.torchao.quantize_base(model, 'int8' or "
    "'int4'), or leave this module out with exclude_modules")
