"""DoRA on bitsandbytes 4-bit and 8-bit bases against PEFT 0.21.2.

Oracle: PEFT on the same quantized layers (built by hand from one float layer) with identical
adapter weights. Both dequantize the same packed weight for the norm, so fp32 outputs and
gradients agree to atol 1e-5 / rtol 1e-4; 8-bit matmuls on the CPU run in fp16 inside
bitsandbytes for both libraries, so the same tolerance holds there only up to that: atol 1e-3.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

from loracast import LoraConfig, get_peft_model
from tests.support.bnb_models import TwoLayer, copy_lora, float_linear, linear4bit, linear8bit, packed_bytes

X = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))


def quantized(bits: int) -> TwoLayer:
    make = (lambda s: linear4bit(s)) if bits == 4 else linear8bit
    return TwoLayer(make(float_linear(seed=0)), make(float_linear(seed=1)))


@pytest.mark.parametrize("bits", [4, 8])
def test_dora_on_bnb_matches_peft_outputs_gradients_and_files(bits, tmp_path):
    template = quantized(bits)
    options = dict(r=4, lora_alpha=8, target_modules=["first", "second"], use_dora=True)
    ours = get_peft_model(copy.deepcopy(template), LoraConfig(**options))
    theirs = peft.get_peft_model(copy.deepcopy(template), peft.LoraConfig(**options))
    names = {n: tuple(p.shape) for n, p in ours.named_parameters() if p.requires_grad}
    assert names == {n: tuple(p.shape) for n, p in theirs.named_parameters() if p.requires_grad}
    magnitude = dict(ours.named_parameters())["base_model.model.first.lora_magnitude_vector.default.weight"]
    torch.testing.assert_close(magnitude, dict(theirs.named_parameters())[
        "base_model.model.first.lora_magnitude_vector.default.weight"], atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    copy_lora(theirs, ours)
    atol = 1e-5 if bits == 4 else 1e-3
    ours.train(), theirs.train()
    got, expected = ours(X), theirs(X)
    torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4)
    got.square().mean().backward()
    expected.square().mean().backward()
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, theirs_params[name].grad, atol=atol, rtol=1e-3, msg=name)
    ours.save_pretrained(tmp_path)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(template), tmp_path).train()
    with torch.no_grad():  # train mode: in eval mode bitsandbytes repacks 4-bit weights for its CPU kernel,
        # and PEFT's DoRA then reads the repacked bytes as if they were not (its norm goes wrong)
        torch.testing.assert_close(back(X), ours(X), atol=atol, rtol=1e-4)
        reference = ours(X)
        ours.eval()  # loracast reads a repacked weight through its backend: the norm stays right
        torch.testing.assert_close(ours(X), reference, atol=0.02, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_dora_merge_on_bnb_and_unmerge_restores_the_packed_bytes(bits):
    model = get_peft_model(quantized(bits), LoraConfig(r=4, target_modules=["first"], use_dora=True)).eval()
    layer = model.base_model.model.first
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        layer.lora_magnitude_vector["default"].weight.mul_(1.1)
        unmerged = model(X)  # (a first eval-mode forward may repack a 4-bit weight: read the bytes after it)
        before_bytes = packed_bytes(layer.base_layer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the requantization warning is tested elsewhere
            model.merge_adapter()
        assert packed_bytes(layer.base_layer) != before_bytes
        # requantizing the rescaled weight costs one quantization step, not more
        merged = model(X)
        tolerance = 0.15 if bits == 4 else 0.05
        assert (merged - unmerged).abs().max() < tolerance
        model.unmerge_adapter()
        assert packed_bytes(layer.base_layer) == before_bytes
        torch.testing.assert_close(model(X), unmerged, atol=0, rtol=0)
