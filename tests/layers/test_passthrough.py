"""LoRA layers pass the wrapped layer's `weight` and `bias` through, read-only, as PEFT's do.

Oracle: PEFT 0.21.2 on the same models with identical adapter weights; fp32 outputs atol 1e-5.
"""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from loracast import LoracastError, LoraConfig, get_peft_model
from tests.support.models import copy_params, randomize_adapters


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def test_t5_feed_forward_reads_wo_weight_dtype_and_matches_peft():
    """transformers' T5DenseActDense reads `self.wo.weight.dtype` in its forward."""
    ours = get_peft_model(tiny_t5(), LoraConfig(r=4, lora_alpha=8, target_modules=["wo"]))
    theirs = peft.get_peft_model(tiny_t5(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["wo"]))
    randomize_adapters(theirs)
    copy_params(theirs, ours)
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(input_ids=ids, decoder_input_ids=ids).logits
        expected = theirs(input_ids=ids, decoder_input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    wo = ours.base_model.model.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.weight is wo.base_layer.weight and wo.weight.dtype == torch.float32


class ReadsConvWeight(nn.Module):
    """A model whose forward reads its conv layer's weight device and dtype and its bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=self.conv.weight.device, dtype=self.conv.weight.dtype)
        return self.conv(x) * self.conv.bias.sign().view(1, -1, 1, 1)


def test_forward_reading_conv_weight_device_matches_peft():
    torch.manual_seed(0)
    base = ReadsConvWeight()
    ours = get_peft_model(ReadsConvWeight(), LoraConfig(r=2, target_modules=["conv"]))
    theirs = peft.get_peft_model(ReadsConvWeight(), peft.LoraConfig(r=2, target_modules=["conv"]))
    for model in (ours, theirs):
        model.base_model.model.conv.base_layer.load_state_dict(base.conv.state_dict())
    randomize_adapters(theirs)
    copy_params(theirs, ours)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_weight_and_bias_cannot_be_replaced_through_the_wrapper():
    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    layer = model.base_model.model[0]
    original = layer.base_layer.weight
    assert layer.weight is original and layer.bias is layer.base_layer.bias
    for name in ("weight", "bias"):
        with pytest.raises(LoracastError, match=f"base_layer.{name}"):
            setattr(layer, name, nn.Parameter(torch.zeros(4, 4)))
    assert layer.base_layer.weight is original
    no_bias = get_peft_model(nn.Sequential(nn.Linear(4, 4, bias=False)), LoraConfig(r=2, target_modules=["0"]))
    assert no_bias.base_model.model[0].bias is None
