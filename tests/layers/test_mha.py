"""LoRA on `nn.MultiheadAttention` against PEFT 0.21.2: names, outputs, gradients, files, merge.

Oracle: PEFT with identical base and adapter weights; fp32 outputs and gradients atol 1e-5 /
rtol 1e-4 (the same computation); merges against the float64 sum rounded once.

PEFT 0.21.2 adds the out_proj update twice (its merge writes ``W + dW`` and then calls the
out_proj wrapper's own merge, which adds ``dW`` again; its forward merges too), a known bug
(huggingface/peft pull request 3774). loracast adds it once. So the comparisons with PEFT's
outputs zero the out_proj factor B (the rest of the computation is then PEFT's), and a plain
`nn.MultiheadAttention` holding ``W + dW`` is the oracle for the whole update.
"""

from __future__ import annotations

import peft
import torch
from torch import nn

from loracast import LoraConfig, PeftModel, get_peft_model
from loracast.layers.merge import round_once
from tests.support.models import copy_params, randomize_adapters

X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out)


def attn_net(dtype=torch.float32) -> AttnNet:
    torch.manual_seed(0)
    net = AttnNet()
    with torch.no_grad():  # a non-zero in_proj bias, so it is checked too
        net.attn.in_proj_bias.normal_(0, 0.1)
    return net.to(dtype)


def pair(dtype=torch.float32, out_proj_update=True):
    options = dict(r=4, lora_alpha=8, target_modules=["attn"])
    theirs = peft.get_peft_model(attn_net(dtype), peft.LoraConfig(**options))
    ours = get_peft_model(attn_net(dtype), LoraConfig(**options))
    randomize_adapters(theirs)
    if not out_proj_update:
        with torch.no_grad():
            theirs.base_model.model.attn.base_layer.out_proj.lora_B["default"].weight.zero_()
    copy_params(theirs, ours)
    return ours, theirs


def test_names_outputs_and_gradients_match_peft():
    ours, theirs = pair(out_proj_update=False)
    trainable = {n: tuple(p.shape) for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n: tuple(p.shape) for n, p in theirs.named_parameters() if p.requires_grad}
    assert "base_model.model.attn.base_layer.out_proj.lora_A.default.weight" in trainable
    got, expected = ours(X), theirs(X)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    got.square().sum().backward()
    expected.square().sum().backward()
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if param.requires_grad and "out_proj.lora_A" not in name:  # A's gradient is zero with B zero
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            torch.testing.assert_close(param.grad, theirs_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad(), ours.disable_adapter():
        assert (ours(X) - got).abs().max() > 1e-3  # the adapter really acts


def test_outputs_equal_a_plain_module_holding_the_updated_weights():
    ours, _ = pair()
    attn = ours.base_model.model.attn
    reference = attn_net()
    with torch.no_grad():
        reference.attn.in_proj_weight.add_(attn.get_delta_weight("default").float())
        reference.attn.out_proj.weight.add_(attn.out_proj_lora.get_delta_weight("default").float())
        torch.testing.assert_close(ours(X), reference(X), atol=1e-5, rtol=1e-4)


def test_files_load_both_ways(tmp_path):
    ours, theirs = pair(out_proj_update=False)
    with torch.no_grad():
        expected = theirs(X)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(attn_net(), tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(attn_net(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(back(X), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(loaded(X), expected, atol=1e-5, rtol=1e-4)


def test_merge_rounds_once_unmerge_restores_bits_and_unload_gives_plain_modules():
    ours, _ = pair(torch.bfloat16)
    attn = ours.base_model.model.attn
    in_w = attn.base_layer.in_proj_weight.detach().clone()
    out_w = attn.out_proj_lora.base_layer.weight.detach().clone()
    with torch.no_grad():
        before = ours(X.bfloat16())
        ours.merge_adapter()
        expected_in = round_once(in_w.double() + attn.get_delta_weight("default"), torch.bfloat16)
        assert torch.equal(attn.base_layer.in_proj_weight, expected_in)
        expected_out = round_once(out_w.double() + attn.out_proj_lora.get_delta_weight("default"), torch.bfloat16)
        assert torch.equal(attn.out_proj_lora.base_layer.weight, expected_out)
        torch.testing.assert_close(ours(X.bfloat16()), before, atol=0.05, rtol=0)  # bf16 rounding of the weights
        ours.unmerge_adapter()
        assert torch.equal(attn.base_layer.in_proj_weight, in_w)
        assert torch.equal(attn.out_proj_lora.base_layer.weight, out_w)
        assert torch.equal(ours(X.bfloat16()), before)
        plain = ours.merge_and_unload()
    assert type(plain.attn) is nn.MultiheadAttention and type(plain.attn.out_proj).__name__ == \
        "NonDynamicallyQuantizableLinear"
    assert torch.equal(plain.attn.in_proj_weight, expected_in)


def test_fp32_merge_matches_peft_merge_but_adds_the_out_proj_update_once():
    ours, theirs = pair()
    attn = ours.base_model.model.attn
    out_w = attn.out_proj_lora.base_layer.weight.detach().double()
    out_delta = attn.out_proj_lora.get_delta_weight("default")
    with torch.no_grad():
        merged = theirs.merge_and_unload()
        ours.merge_adapter()
    torch.testing.assert_close(attn.base_layer.in_proj_weight, merged.attn.in_proj_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(attn.out_proj_lora.base_layer.weight.double(), out_w + out_delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged.attn.out_proj.weight.double(), out_w + 2 * out_delta, atol=1e-6, rtol=0)
