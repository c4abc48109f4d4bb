"""Small HQQ-quantized models for the HQQ tests (hqq's pure-PyTorch backend, on the CPU).

`hqq_linear` quantizes one float `nn.Linear` the way a user does, with hqq's own `HQQLinear`;
`load_llama` quantizes the tiny Llama of conftest with loracast's `quantize_base`. `BITS` names the
bit widths tested.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("hqq")  # an optional dependency: `pip install 'loracast[hqq]'`

from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

from bnb_models import _saved_llama

BITS = (8, 4, 2)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def float_linear(in_features: int = 64, out_features: int = 48, bias: bool = True, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def hqq_linear(nbits: int = 4, dtype: torch.dtype = torch.float32, group_size: int = 32, **kwargs) -> HQQLinear:
    """A float Linear quantized by hqq's own `HQQLinear`, computing in `dtype`."""
    return HQQLinear(float_linear(dtype=dtype, **kwargs), BaseQuantizeConfig(nbits=nbits, group_size=group_size),
                     compute_dtype=dtype, device="cpu")


def packed(layer: HQQLinear) -> dict[str, torch.Tensor]:
    """Copies of every tensor an HQQ layer holds (codes, scales, zero points, bias)."""
    out = {"W_q": layer.W_q.detach().clone()}
    out.update({k: v.clone() for k, v in layer.meta.items() if isinstance(v, torch.Tensor)})
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().clone()
    return out


def same_packed(layer: HQQLinear, before: dict[str, torch.Tensor]) -> bool:
    now = packed(layer)
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


@functools.cache
def _llama(nbits: int, dtype: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from loracast.quant.hqq import quantize_base

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(_saved_llama(False), dtype=DTYPES[dtype])
    return quantize_base(model, nbits=nbits, group_size=32)


def load_llama(nbits: int = 4, dtype: str = "bf16") -> nn.Module:
    """A fresh copy of the tiny Llama with HQQ `nbits` linear layers (the output head stays float)."""
    return copy.deepcopy(_llama(nbits, dtype))
