"""DoRA (`use_dora=True`) against PEFT 0.21.2 as the oracle, per layer type.

Oracle: PEFT with identical base and adapter weights (copied parameter by parameter, or through
each other's files). Tolerances: fp32 outputs and gradients atol 1e-5 / rtol 1e-4 (the same
formula, with the weight norm computed another way: loracast expands ``||W + s*B@A||^2``,
PEFT reduces the explicit matrix, so the two differ by fp32 rounding noise only).
"""

from __future__ import annotations

import functools

import peft
import pytest
import torch
from tests.models import LAYER_TARGETS, copy_params, mixed_net, randomize_adapters
from torch import nn

from loracast import LoraConfig, PeftModel, get_peft_model
from loracast.errors import ConfigError
from loracast.layers import LoraLayer

IDS = torch.randint(0, 32, (3, 8), generator=torch.Generator().manual_seed(0))
ALL_TARGETS = [t for names in LAYER_TARGETS.values() for t in names]


class Conv3dNet(nn.Module):
    """One Conv3d, the kind MixedNet lacks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(3, 6, kernel_size=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3d(x)


def pair(make=mixed_net, dtype=torch.float32, autocast=True, **config):
    config.setdefault("target_modules", ALL_TARGETS)
    options = dict(r=4, lora_alpha=8, use_dora=True, **config)
    theirs = peft.get_peft_model(make(dtype), peft.LoraConfig(**options), autocast_adapter_dtype=autocast)
    ours = get_peft_model(make(dtype), LoraConfig(**options), autocast_adapter_dtype=autocast)
    return ours, theirs


def conv3d_net(dtype=torch.float32):
    torch.manual_seed(0)
    return Conv3dNet().to(dtype)


def trainable(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def test_names_shapes_and_initial_magnitude_match_peft():
    ours, theirs = pair()
    assert trainable(ours) == trainable(theirs)
    assert any("lora_magnitude_vector.default.weight" in n for n in trainable(ours))
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if "lora_magnitude_vector" in name:  # ||W|| per row at creation (B is zero)
            torch.testing.assert_close(param, theirs_params[name], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layer", sorted(LAYER_TARGETS) + ["Conv3d"])
def test_fp32_outputs_and_gradients_match_peft(layer):
    if layer == "Conv3d":
        ours, theirs = pair(conv3d_net, target_modules=["conv3d"])
        inputs = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    else:
        ours, theirs = pair(target_modules=LAYER_TARGETS[layer])
        inputs = IDS
    randomize_adapters(theirs)
    with torch.no_grad():  # magnitudes near the norms, so the rescaling is realistic
        for name, param in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                param.add_(1.0)
    copy_params(theirs, ours)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(inputs), theirs(inputs), atol=1e-5, rtol=1e-4)
    ours.train(), theirs.train()
    ours(inputs).square().mean().backward()
    theirs(inputs).square().mean().backward()
    theirs_params = dict(theirs.named_parameters())
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, theirs_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_training_with_dropout_matches_peft_step_by_step():
    ours, theirs = pair(target_modules=["lin", "gpt_conv", "conv1d"], lora_dropout=0.25)
    randomize_adapters(theirs)
    copy_params(theirs, ours)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, theirs)]
    for step in range(3):
        losses = []
        for model, opt in zip((ours, theirs), opts):
            torch.manual_seed(step)  # the same dropout masks on both sides
            loss = model(IDS).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, theirs_params[name], atol=1e-5, rtol=1e-4, msg=name)


def test_files_load_both_ways(tmp_path):
    _, theirs = pair()
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(mixed_net(), tmp_path / "peft").eval()
    with torch.no_grad():
        expected = theirs.eval()(IDS)
        torch.testing.assert_close(loaded(IDS), expected, atol=1e-5, rtol=1e-4)
    loaded.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    ours_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ours_keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.lin.lora_magnitude_vector" in ours_keys
    back = peft.PeftModel.from_pretrained(mixed_net(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_magnitude_dtype_follows_the_adapter_rule_as_peft(dtype, autocast):
    ours, theirs = pair(dtype=dtype, autocast=autocast)
    expected = {n: p.dtype for n, p in theirs.named_parameters() if "lora_" in n}
    assert {n: p.dtype for n, p in ours.named_parameters() if "lora_" in n} == expected
    with torch.no_grad():
        assert ours(IDS).dtype == theirs(IDS).dtype == dtype


def test_merge_rounds_once_and_unmerge_restores_bf16_bits():
    ours, _ = pair(dtype=torch.bfloat16)
    randomize_adapters(ours, scale=0.2)
    ours.eval()
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoraLayer) and m.use_dora}
    originals = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
    ours.merge_adapter()
    for name, layer in layers.items():
        # oracle: the merged weight computed in float64 and rounded once
        w0 = originals[name].double()
        delta = layer.get_delta_weight("default").double()
        rows = functools.partial(layer.lora_variant["default"].rows, layer)
        factor = layer.lora_magnitude_vector["default"].weight.detach().double().reshape(-1) \
            / rows(w0 + delta).norm(dim=1)
        expected = w0 + delta
        rows(expected).mul_(factor[:, None])
        from loracast.layers.merge import round_once
        assert torch.equal(layer.get_base_layer().weight, round_once(expected, torch.bfloat16)), name
    ours.unmerge_adapter()
    for name, layer in layers.items():
        assert torch.equal(layer.get_base_layer().weight, originals[name]), name


def test_merged_outputs_equal_unmerged_in_fp32_and_match_peft_merge():
    ours, theirs = pair()
    randomize_adapters(theirs)
    copy_params(theirs, ours)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        before = ours(IDS)
        ours.merge_adapter()
        torch.testing.assert_close(ours(IDS), before, atol=1e-5, rtol=1e-4)
        ours.merge_adapter()  # idempotent
        torch.testing.assert_close(ours(IDS), before, atol=1e-5, rtol=1e-4)
        theirs_merged = theirs.merge_and_unload()
        ours_params = dict(ours.named_parameters())
        for name, param in theirs_merged.named_parameters():
            ours_name = "base_model.model." + name.replace(".weight", ".base_layer.weight")
            if ours_name in ours_params:
                torch.testing.assert_close(ours_params[ours_name], param, atol=1e-5, rtol=1e-4, msg=name)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(IDS), before, atol=0, rtol=0)
        merged = ours.merge_and_unload()
        torch.testing.assert_close(merged(IDS), before, atol=1e-5, rtol=1e-4)


def test_weight_norm_on_bf16_base_is_float32_accurate_and_peft_is_not():
    """Oracle: ||W + s*B@A|| per row in float64 from the same bf16 weights and fp32 factors."""
    torch.manual_seed(0)
    base = nn.Linear(256, 256).to(torch.bfloat16)
    ours = get_peft_model(nn.Sequential(base), LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["0"]),
                          autocast_adapter_dtype=False)
    layer = ours.base_model.model[0]
    randomize_adapters(ours, scale=0.05)
    w, a, b = layer.base_layer.weight.double(), layer.lora_A["default"].weight.double(), \
        layer.lora_B["default"].weight.double()
    reference = (w + layer.scaling["default"] * b @ a).norm(dim=1)
    got = layer.lora_variant["default"].weight_norm(layer, "default")
    assert got.dtype == torch.float32
    ours_error = ((got.double() - reference).abs() / reference).max().item()
    # PEFT's norm for the same bf16 adapter: computed in the activation dtype (bf16)
    peft_layer = peft.tuners.lora.dora.DoraLinearLayer(fan_in_fan_out=False)
    lora_weight = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    peft_norm = peft_layer.get_weight_norm(layer.base_layer.weight, lora_weight, layer.scaling["default"])
    peft_error = ((peft_norm.double() - reference).abs() / reference).max().item()
    assert ours_error < 1e-6 < 1e-4 < peft_error


def test_dora_refusals_name_the_fix():
    with pytest.raises(ConfigError, match="lora_bias"):
        LoraConfig(target_modules=["lin"], use_dora=True, lora_bias=True)
    ours, _ = pair(target_modules=["lin"])
    with pytest.raises(ValueError, match="DoRA"):
        ours(IDS, adapter_names=["default"] * 3)


def test_norm_is_reused_until_a_factor_changes_and_inference_mode_works():
    ours, _ = pair(target_modules=["lin"])
    layer = ours.base_model.model.lin
    variant = layer.lora_variant["default"]
    first = variant.weight_norm(layer, "default")
    assert variant.weight_norm(layer, "default") is first  # nothing changed: the cached tensor
    with torch.no_grad():
        layer.lora_B["default"].weight.add_(0.1)  # what an optimizer step does
    second = variant.weight_norm(layer, "default")
    assert second is not first
    torch.testing.assert_close(second.double(), variant.direct_weight_norm(layer, "default"), atol=1e-6, rtol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(ours(IDS), ours(IDS))
