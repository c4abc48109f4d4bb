"""LoRA outputs equal PEFT's on the same adapter weights, per layer type and dtype.

Oracle: PEFT 0.21 with identical base and adapter weights. Tolerances: fp32 atol 1e-5 (the
issue's bar; the computations are the same, so they agree to rounding noise); bf16/fp16 outputs
must be bit-identical, since loracast casts at the same two points as PEFT.
"""

from __future__ import annotations

import peft
import pytest
import torch

from loracast import LoraConfig, get_peft_model
from tests.support.models import LAYER_TARGETS, copy_params, mixed_net, randomize_adapters

ALL_TARGETS = [t for names in LAYER_TARGETS.values() for t in names]


def pair(dtype, autocast=True, **config):
    config.setdefault("target_modules", ALL_TARGETS)
    ours = get_peft_model(mixed_net(dtype), LoraConfig(r=4, lora_alpha=8, **config), autocast_adapter_dtype=autocast)
    theirs = peft.get_peft_model(mixed_net(dtype), peft.LoraConfig(r=4, lora_alpha=8, **config),
                                 autocast_adapter_dtype=autocast)
    randomize_adapters(theirs)
    copy_params(theirs, ours)
    return ours.eval(), theirs.eval()


IDS = torch.randint(0, 32, (3, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layer", sorted(LAYER_TARGETS))
def test_fp32_outputs_match_peft_per_layer_type(layer):
    ours, theirs = pair(torch.float32, target_modules=LAYER_TARGETS[layer])
    with torch.no_grad():
        expected = theirs(IDS)
        got = ours(IDS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with torch.no_grad(), ours.disable_adapter():
        plain = ours(IDS)
    assert (plain - got).abs().max() > 1e-4  # the adapter really changed the output


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_outputs_equal_peft(dtype, autocast):
    ours, theirs = pair(dtype, autocast=autocast)
    with torch.no_grad():
        got, expected = ours(IDS), theirs(IDS)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_options_match_peft_rslora_dropout_off_bias_and_patterns():
    config = dict(use_rslora=True, lora_bias=True, target_modules=["lin", "gpt_conv", "conv2d"],
                  rank_pattern={"conv2d": 2}, alpha_pattern={"lin": 3})
    ours, theirs = pair(torch.float32, **config)
    assert ours.base_model.model.conv2d.r["default"] == 2
    assert ours.base_model.model.lin.scaling["default"] == theirs.base_model.model.lin.scaling["default"]
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs(IDS), atol=1e-5, rtol=0)


def test_gradients_match_peft_and_reach_only_adapters():
    ours, theirs = pair(torch.float32)
    for model in (ours, theirs):
        model.train()
        model(IDS).square().mean().backward()
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(theirs_grads)
    assert all("lora_" in n for n in ours_grads)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs_grads[name], atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for n, p in ours.named_parameters() if not p.requires_grad)


def test_cpu_autocast_lets_autocast_pick_the_matmul_dtype():
    ours, theirs = pair(torch.float32, target_modules=["lin", "gpt_conv"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = ours(IDS), theirs(IDS)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_mixed_batch_equals_per_adapter_runs():
    ours, _ = pair(torch.float32, target_modules=["lin", "emb", "conv2d"], modules_to_save=["head"])
    ours.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["lin", "emb", "conv2d"],
                                         modules_to_save=["head"]))
    randomize_adapters(ours, seed=5)
    with torch.no_grad():
        ours.base_model.model.head.modules_to_save["other"].weight.add_(0.5)
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        mixed = ours(IDS, adapter_names=names)
        ours.set_adapter("default")
        first = ours(IDS[:1])
        ours.set_adapter("other")
        second = ours(IDS[1:2])
        with ours.disable_adapter():
            third = ours(IDS[2:])
    torch.testing.assert_close(mixed, torch.cat([first, second, third]), atol=1e-6, rtol=0)


def test_mixed_batch_with_unknown_name_or_wrong_length_is_refused():
    ours, _ = pair(torch.float32, target_modules=["lin"])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        ours(IDS, adapter_names=["default", "nope", "default"])
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 3 samples"):
        ours(IDS, adapter_names=["default", "default"])
