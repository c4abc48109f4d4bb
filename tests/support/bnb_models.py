"""Small bitsandbytes-quantized models for the quantization tests.

`load_llama` loads the tiny Llama of conftest through transformers' `BitsAndBytesConfig`, as users
do; each distinct configuration is loaded once per test session and handed out as deep copies
(a few milliseconds), since a forward in eval mode may repack a 4-bit weight in place.
`linear4bit` / `linear8bit` build single layers by hand from a float `nn.Linear`.
"""

from __future__ import annotations

import atexit
import copy
import functools
import logging
import shutil
import tempfile

import torch
from torch import nn

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import bitsandbytes as bnb  # noqa: E402

from tests.support.models import tiny_llama_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "uint8": torch.uint8}


@functools.cache
def _saved_llama(tie_word_embeddings: bool) -> str:
    from transformers import LlamaForCausalLM

    folder = tempfile.mkdtemp(prefix="loracast-tiny-llama-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tie_word_embeddings)).save_pretrained(folder)
    return folder


@functools.cache
def _loaded(bits: int, dtype: str, storage: str, compute: str, quant_type: str, double_quant: bool,
            tie_word_embeddings: bool, device: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                   bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=DTYPES[compute],
                                   bnb_4bit_quant_storage=DTYPES[storage])
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(_saved_llama(tie_word_embeddings), quantization_config=quant,
                                                device_map=device, dtype=DTYPES[dtype])


def load_llama(bits: int = 4, dtype: str = "bf16", storage: str = "uint8", compute: str = "bf16",
               quant_type: str = "nf4", double_quant: bool = False, tie_word_embeddings: bool = False,
               device: str = "cpu") -> nn.Module:
    """A fresh copy of the tiny Llama loaded in `bits` bits by transformers on `device` (eval mode, as loaded)."""
    return copy.deepcopy(_loaded(bits, dtype, storage, compute, quant_type, double_quant, tie_word_embeddings,
                                 device))


def float_linear(in_features: int = 64, out_features: int = 64, bias: bool = True, seed: int = 0) -> nn.Linear:
    """The float layer the quantized ones below are made from."""
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def linear4bit(source: nn.Linear, quant_type: str = "nf4", storage: torch.dtype = torch.uint8,
               double_quant: bool = False, compute_dtype: torch.dtype | None = torch.float32,
               weight_dtype: torch.dtype = torch.float32) -> nn.Module:
    """`source` quantized by hand into a `bnb.nn.Linear4bit` (quantized from `weight_dtype`)."""
    layer = bnb.nn.Linear4bit(source.in_features, source.out_features, bias=source.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                              quant_storage=storage)
    layer.load_state_dict({k: v.to(weight_dtype) for k, v in source.state_dict().items()})
    return layer.to("cpu")  # quantizes


def linear8bit(source: nn.Linear, threshold: float = 0.0) -> nn.Module:
    """`source` quantized by hand into a `bnb.nn.Linear8bitLt` (int8 weight, row scales)."""
    layer = bnb.nn.Linear8bitLt(source.in_features, source.out_features, bias=source.bias is not None,
                                has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict(source.state_dict())
    return layer.to("cpu")  # quantizes


class TwoLayer(nn.Module):
    """x -> first -> relu -> second: gradients of `first`'s adapter pass through `second`."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> detached copy of every LoRA tensor of a loracast or PEFT model."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if "lora_" in name}


def copy_lora(source: nn.Module, target: nn.Module) -> None:
    """Copy the LoRA tensors of `source` into `target` (same names; loracast and PEFT agree)."""
    params = dict(target.named_parameters())
    with torch.no_grad():
        for name, value in lora_tensors(source).items():
            params[name].copy_(value)


def packed_bytes(layer: nn.Module) -> dict[str, bytes]:
    """The bytes of a bitsandbytes layer's stored weight and quantization statistics."""
    weight = layer.weight
    out = {"data": weight.data.contiguous().view(torch.uint8).cpu().numpy().tobytes()}
    state = getattr(weight, "quant_state", None)
    if state is not None:
        out["absmax"] = state.absmax.contiguous().view(torch.uint8).cpu().numpy().tobytes()
        if getattr(state, "state2", None) is not None:
            out["nested_absmax"] = state.state2.absmax.contiguous().view(torch.uint8).cpu().numpy().tobytes()
            out["offset"] = state.offset.reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
    scales = getattr(layer, "state", None)
    scb = getattr(scales, "SCB", None) if scales is not None else None
    if scb is None:
        scb = getattr(weight, "SCB", None)
    if scb is not None:
        out["SCB"] = scb.contiguous().view(torch.uint8).cpu().numpy().tobytes()
    return out
