"""Merges round exactly once; unmerge restores the base bit for bit.

Oracles: the merged weight must equal ``(W.double() + delta).to(dtype)`` element for element,
where ``delta`` is the layer's fp32 delta; unmerged weights must equal the pre-merge weights
exactly (torch.equal on the bit patterns).
"""

from __future__ import annotations

import pytest
import torch

from loracast import LoraConfig, NonFiniteMergeError, get_peft_model
from loracast.layers.merge import BitResidual, exact_sum
from tests.support.models import LAYER_TARGETS, mixed_net, randomize_adapters
from tests.support.rounding_oracle import nearest_even

ALL_TARGETS = [t for names in LAYER_TARGETS.values() for t in names if t != "conv2d"] + ["conv2d"]
IDS = torch.randint(0, 32, (3, 8), generator=torch.Generator().manual_seed(0))


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_merged_weight_is_the_exact_sum_rounded_once(dtype):
    model = get_peft_model(mixed_net(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=ALL_TARGETS))
    randomize_adapters(model, scale=0.05)
    layers = {name: layer for name, layer in model.base_model.lora_layers()}
    expected = {}
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        delta = layer.get_delta_weight("default")
        assert delta.dtype == torch.float64
        expected[name] = nearest_even(weight.double() + delta, dtype)  # torch's own cast rounds twice
    model.merge_adapter()
    for name, layer in layers.items():
        assert torch.equal(layer.get_base_layer().weight, expected[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_merge_then_unmerge_restores_every_base_weight_bit_for_bit(dtype):
    with_bias = [t for t in ALL_TARGETS if t != "emb"]  # lora_bias is refused on embeddings
    model = get_peft_model(mixed_net(dtype), LoraConfig(r=4, target_modules=with_bias, lora_bias=True))
    model.add_adapter("emb", LoraConfig(r=4, target_modules=["emb"]))
    model.add_adapter("two", LoraConfig(r=2, target_modules=["lin", "conv1d"]))
    randomize_adapters(model, scale=0.2)
    before = base_weights(model)
    model.merge_adapter(["default", "two", "emb"])
    changed = sum(int(not torch.equal(before[n], p)) for n, p in model.named_parameters() if n in before)
    assert changed > 0
    assert model.merge_restore_nbytes() > 0
    model.unmerge_adapter()
    after = base_weights(model)
    assert all(bits_equal(before[n], after[n]) for n in before)
    assert model.merge_restore_nbytes() == 0


def test_merge_is_idempotent_and_outputs_match_unmerged():
    model = get_peft_model(mixed_net(), LoraConfig(r=4, target_modules=ALL_TARGETS)).eval()
    randomize_adapters(model)
    with torch.no_grad():
        unmerged = model(IDS)
        model.merge_adapter()
        once = base_weights(model)
        merged = model(IDS)
        model.merge_adapter()
        assert all(torch.equal(once[n], p) for n, p in base_weights(model).items())
        assert torch.equal(model(IDS), merged)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_merging_a_second_adapter_rounds_the_total_once():
    model = get_peft_model(mixed_net(torch.bfloat16), LoraConfig(r=4, target_modules=["lin"]))
    model.add_adapter("b", LoraConfig(r=4, target_modules=["lin"]))
    randomize_adapters(model, scale=0.05)
    layer = model.base_model.model.lin
    w0 = layer.get_base_layer().weight.detach().clone()
    expected = (w0.double() + layer.get_delta_weight("default").double()
                + layer.get_delta_weight("b").double()).to(torch.bfloat16)
    model.merge_adapter(["default"])
    model.merge_adapter(["b"])
    assert layer.merged_adapters == ["default", "b"]
    assert torch.equal(layer.get_base_layer().weight, expected)
    model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, w0)


def test_safe_merge_refuses_non_finite_and_leaves_weights_unchanged():
    model = get_peft_model(mixed_net(torch.float16), LoraConfig(r=4, target_modules=["lin"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.base_model.model.lin.lora_B["default"].weight.fill_(1e6)  # the fp16 sum overflows to inf
    before = base_weights(model)
    with pytest.raises(NonFiniteMergeError, match="merging adapter\\(s\\) default into the weight of a Linear"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(before[n], p) for n, p in base_weights(model).items())
    assert not model.base_model.model.lin.merged


def test_merge_and_unload_returns_the_plain_model_with_equal_outputs():
    model = get_peft_model(mixed_net(), LoraConfig(r=4, target_modules=ALL_TARGETS, modules_to_save=["head"])).eval()
    randomize_adapters(model)
    with torch.no_grad():
        model.base_model.model.head.modules_to_save["default"].weight.mul_(1.5)
        expected = model(IDS)
        plain = model.merge_and_unload()
        got = plain(IDS)
    assert type(plain).__name__ == "MixedNet"
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_unload_gives_back_the_untouched_base():
    base = mixed_net()
    reference = {n: p.clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, target_modules=ALL_TARGETS))
    randomize_adapters(model)
    model.merge_adapter()
    plain = model.unload()
    assert all(torch.equal(reference[n], p) for n, p in plain.named_parameters())


def test_disable_adapter_while_merged_unmerges_exactly_and_merges_back():
    model = get_peft_model(mixed_net(torch.bfloat16), LoraConfig(r=4, target_modules=["lin", "emb"])).eval()
    randomize_adapters(model)
    before = base_weights(model)
    with torch.no_grad():
        model.merge_adapter()
        merged = base_weights(model)
        with model.disable_adapter():
            assert all(torch.equal(before[n], p) for n, p in base_weights(model).items())
            plain = model(IDS)
        assert all(torch.equal(merged[n], p) for n, p in base_weights(model).items())
        model.unmerge_adapter()
        with model.disable_adapter():
            assert torch.equal(model(IDS), plain)


def test_grouped_conv_cannot_merge_and_says_why():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="groups=2"):
        model.merge_adapter()


# -- the restore record itself, on adversarial weights -------------------------------------------

def special_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    values = [0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, info.max, -info.max, 1.0, -1.0, info.eps]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("delta_scale", [1e-3, 1e-1, 10.0])
def test_bit_residual_restores_exactly_whatever_the_delta(dtype, delta_scale):
    generator = torch.Generator().manual_seed(3)
    weight = torch.cat([torch.randn(4000, generator=generator).to(dtype), special_values(dtype)])
    delta = torch.randn(weight.shape, generator=generator) * delta_scale
    delta[-10:] = torch.tensor([1e-30, -1e-30, 1e-30, 0.0, 0.0, 0.0, 0.0, -2.0, 2.0, 0.0])  # sign flips, subnormals
    merged = exact_sum(weight, [delta])
    record = BitResidual.between(weight, merged)
    assert bits_equal(record.restore(merged), weight)
    assert record.nbytes <= weight.numel() * weight.element_size() + 16


def test_bit_residual_uses_int8_when_deltas_are_small():
    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    delta = torch.randn(256, 256, generator=torch.Generator().manual_seed(1)) * 0.01 * weight.float().std()
    record = BitResidual.between(weight, exact_sum(weight, [delta]))
    assert record.mode == "int8"
    assert record.nbytes < 0.6 * weight.numel() * weight.element_size()
