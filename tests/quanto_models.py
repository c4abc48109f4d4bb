"""Small optimum-quanto models for the quanto tests (qint8/qint4/qint2 weights, on the CPU).

`quanto_linear` quantizes one float `nn.Linear` the way a user does, with quanto's own `quantize`
(and `freeze`); `load_llama` quantizes the tiny Llama of conftest the same way, the output head
left float. `QTYPES` names the weight types tested.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("optimum.quanto")  # an optional dependency: `pip install 'loracast[quanto]'`

from optimum.quanto import QTensor, freeze, qint2, qint4, qint8, quantize

from bnb_models import _saved_llama  # the same saved tiny Llama as the bitsandbytes tests

QTYPES = {"qint8": qint8, "qint4": qint4, "qint2": qint2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def float_linear(in_features: int = 64, out_features: int = 48, bias: bool = True, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def quantized(module: nn.Module, qtype: str, frozen: bool = True, **kwargs) -> nn.Module:
    """`module` with its linear layers quantized in place by quanto (weights only), then frozen."""
    quantize(module, weights=QTYPES[qtype], **kwargs)
    if frozen:
        freeze(module)
    return module


def quanto_model(qtype: str = "qint8", dtype: torch.dtype = torch.float32, frozen: bool = True,
                 weight: torch.Tensor | None = None, **kwargs) -> nn.Sequential:
    """`nn.Sequential(QLinear)`: a float Linear (or one holding `weight`) quantized by quanto."""
    layer = float_linear(dtype=dtype, **kwargs)
    if weight is not None:
        layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
    return quantized(nn.Sequential(layer), qtype, frozen)


def packed(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every tensor a quanto weight holds (codes, scales, shifts), or of the float weight."""
    weight = layer.weight
    if isinstance(weight, QTensor):
        return {k: v.clone() for k, v in vars(weight).items() if isinstance(v, torch.Tensor)}
    return {"weight": weight.detach().clone()}


def same_packed(layer: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = packed(layer)
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


@functools.cache
def _float_llama(dtype: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(_saved_llama(False), dtype=DTYPES[dtype])


def load_llama(qtype: str = "qint8", dtype: str = "bf16") -> nn.Module:
    """A fresh tiny Llama with frozen quanto `qtype` linear layers (the head stays float); quantized
    after copying, since quanto's weights cannot be deep-copied."""
    return quantized(copy.deepcopy(_float_llama(dtype)), qtype, exclude="lm_head")
