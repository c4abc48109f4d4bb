"""Small torchao-quantized models for the torchao tests (CPU formats only).

`quantized_linear` quantizes one float `nn.Linear` the way a user does, with torchao's own
`quantize_` (so loracast has to read the config back from the weight); `load_llama` loads the
tiny Llama of conftest through transformers' `TorchAoConfig`, or quantizes it with loracast's
`quantize_base`. `KINDS` names the two CPU formats the backend adapts.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

torchao = pytest.importorskip("torchao")  # an optional dependency: `pip install 'loracast[torchao]'`

from torchao.quantization import (  # noqa: E402
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    MappingType,
    PerGroup,
    quantize_,
)

from tests.support.bnb_models import _saved_llama  # noqa: E402  (the same saved tiny Llama as the bitsandbytes tests)

KINDS = ("int8", "int4")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def config_for(kind: str, asymmetric: bool = False):
    """The torchao config a user would write for `kind` (inductor settings left alone: no global effects)."""
    if kind == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    mapping = MappingType.ASYMMETRIC if asymmetric else MappingType.SYMMETRIC
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32), mapping_type=mapping)


def float_linear(in_features: int = 64, out_features: int = 48, bias: bool = True, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def quantized_linear(kind: str, dtype: torch.dtype = torch.float32, asymmetric: bool = False, **kwargs) -> nn.Linear:
    """A float Linear quantized in place by torchao's `quantize_` with `config_for(kind)`."""
    layer = float_linear(dtype=dtype, **kwargs)
    quantize_(layer, config_for(kind, asymmetric))
    return layer


def packed(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every tensor a torchao weight holds (codes, scales, zero points)."""
    return {k: v.clone() for k, v in vars(layer.weight).items() if isinstance(v, torch.Tensor)}


def same_packed(layer: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = packed(layer)
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


@functools.cache
def _llama(kind: str, dtype: str, how: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, TorchAoConfig

    from loracast.quant.torchao import quantize_base

    folder = _saved_llama(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "transformers":
            return AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=TorchAoConfig(quant_type=config_for(kind)), dtype=DTYPES[dtype])
        return quantize_base(AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype]), kind)


def load_llama(kind: str = "int8", dtype: str = "bf16", how: str = "quantize_base") -> nn.Module:
    """A fresh copy of the tiny Llama with torchao `kind` linear layers, loaded through transformers'
    TorchAoConfig (`how="transformers"`) or quantized by loracast's `quantize_base`."""
    return copy.deepcopy(_llama(kind, dtype, how))
