"""DoRA on a grouped `nn.Conv2d`, against PEFT 0.21.2 as the oracle.

The two models are those of PEFT's own test cases "Conv2d Groups LoRA with DoRA" and "Conv2d
Groups2 LoRA with DoRA" (its `ModelConv2DGroups` and `ModelConv2DGroups2`, written out here),
with PEFT's default rank 8. Oracle: PEFT with identical adapter weights (copied parameter by
parameter, or through each other's files). Tolerances: fp32 outputs and gradients atol 1e-5 /
rtol 1e-4 (the same formula; the weight norm is built in float64 here and in fp32 by PEFT).
"""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file
from tests.models import copy_params, randomize_adapters
from torch import nn

from loracast import LoraConfig, PeftModel, get_peft_model
from loracast.errors import LoracastError


class Conv2dGroups(nn.Module):
    """PEFT's `ModelConv2DGroups`: a 16->16 3x3 convolution in 8 groups between two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.lin1 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin0(x.float().flatten()).reshape(2, 16, 3, 3)
        return torch.log_softmax(self.lin1(torch.relu(self.conv2d(h)).flatten(1)), dim=-1)


class Conv2dGroups2(nn.Module):
    """PEFT's `ModelConv2DGroups2`: a 16->32 3x3 convolution in 2 groups on a fixed input (the
    argument is ignored, as in PEFT)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.lin0 = nn.Linear(12800, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.arange(9 * 16 * 20 * 20, device=self.conv2d.weight.device).view(9, 16, 20, 20).float()
        return torch.log_softmax(self.lin0(torch.relu(self.conv2d(h)).flatten(1)), dim=-1)


MODELS = {"Conv2dGroups": Conv2dGroups, "Conv2dGroups2": Conv2dGroups2}
X = torch.arange(90).view(9, 10)
OPTIONS = dict(target_modules=["conv2d"], use_dora=True)  # PEFT's default r=8, lora_alpha=8


def fresh(model_id: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[model_id]()


def pair(model_id: str, randomize: bool = True):
    """(ours, theirs) on the same base; with `randomize`, PEFT's adapter given random values
    (magnitudes near 1, so the rescaling is realistic) and copied into ours."""
    with pytest.warns(UserWarning, match="groups > 1"):  # PEFT: "Merging is not supported"
        theirs = peft.get_peft_model(fresh(model_id), peft.LoraConfig(**OPTIONS))
    ours = get_peft_model(fresh(model_id), LoraConfig(**OPTIONS))
    if randomize:
        randomize_adapters(theirs, scale=0.3)
        with torch.no_grad():
            for name, param in theirs.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.add_(1.0)
        copy_params(theirs, ours)
    return ours, theirs


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_names_shapes_and_initial_magnitude_match_peft(model_id):
    ours, theirs = pair(model_id, randomize=False)
    ours_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    theirs_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n: p.shape for n, p in ours_params.items()} == {n: p.shape for n, p in theirs_params.items()}
    magnitude = ours_params["base_model.model.conv2d.lora_magnitude_vector.default.weight"]
    assert magnitude.shape == (1, 16 if model_id == "Conv2dGroups" else 32, 1, 1)
    # B is zero at creation: the magnitude is ||W|| per output channel
    base = ours.base_model.model.conv2d.get_base_layer().weight.detach()
    torch.testing.assert_close(magnitude.reshape(-1), base.double().flatten(1).norm(dim=1).float(), atol=0, rtol=0)
    torch.testing.assert_close(magnitude, theirs_params["base_model.model.conv2d.lora_magnitude_vector.default.weight"],
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_fp32_outputs_and_gradients_match_peft(model_id):
    ours, theirs = pair(model_id)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        expected = theirs(X)
        with ours.disable_adapter():
            assert not torch.allclose(expected, ours(X), atol=1e-3)  # the adapter matters
        torch.testing.assert_close(ours(X), expected, atol=1e-5, rtol=1e-4)
    ours.train(), theirs.train()
    # square(): log-softmax outputs whose gradients do not vanish when a class saturates (Groups2's do)
    ours(X).square().mean().backward()
    theirs(X).square().mean().backward()
    theirs_params = dict(theirs.named_parameters())
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(grads) == 3 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        # relative to the whole gradient: Groups2's gradients reach 1e7, and single elements that are
        # sums of cancelling terms differ by the thread count's summation order (up to 4e-4 of themselves)
        expected_grad = theirs_params[name].grad
        relative = float((grad - expected_grad).norm() / expected_grad.norm())
        assert relative < 1e-5, f"{name}: {relative:.2e}"


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_files_load_both_ways(model_id, tmp_path):
    _, theirs = pair(model_id)
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = theirs.eval()(X)
        loaded = PeftModel.from_pretrained(fresh(model_id), tmp_path / "peft").eval()
        torch.testing.assert_close(loaded(X), expected, atol=1e-5, rtol=1e-4)
        loaded.save_pretrained(tmp_path / "ours")
        ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
        theirs_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
        assert set(ours_file) == set(theirs_file)
        assert "base_model.model.conv2d.lora_magnitude_vector" in ours_file
        assert all(torch.equal(ours_file[key], theirs_file[key]) for key in ours_file)
        with pytest.warns(UserWarning, match="groups > 1"):
            back = peft.PeftModel.from_pretrained(fresh(model_id), tmp_path / "ours").eval()
        torch.testing.assert_close(back(X), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_merge_is_refused_and_leaves_the_base_bit_for_bit(model_id):
    """The update spans every input channel, the grouped weight only the in-group ones: no merged
    weight gives the adapter's output (PEFT raises NotImplementedError). The refusal names the fix
    and changes nothing."""
    ours, _ = pair(model_id)
    ours.eval()
    layer = ours.base_model.model.conv2d
    weight = layer.get_base_layer().weight
    before, bias_before = weight.detach().clone(), layer.get_base_layer().bias.detach().clone()
    with torch.no_grad():
        output = ours(X)
    for merge in (ours.merge_adapter, ours.merge_and_unload):
        with pytest.raises(LoracastError, match=r"groups=\d.*keep the adapter unmerged"):
            merge()
        assert not layer.merged
        assert torch.equal(layer.get_base_layer().weight, before)
        assert torch.equal(layer.get_base_layer().bias, bias_before)
    ours.unmerge_adapter()  # nothing merged: a no-op
    assert torch.equal(layer.get_base_layer().weight, before)
    with torch.no_grad():
        assert torch.equal(ours(X), output)


def test_norm_is_reused_until_a_factor_changes():
    ours, _ = pair("Conv2dGroups")
    layer = ours.base_model.model.conv2d
    variant = layer.lora_variant["default"]
    first = variant.weight_norm(layer, "default")
    assert first.dtype == torch.float32
    assert variant.weight_norm(layer, "default") is first
    with torch.no_grad():
        layer.lora_A["default"].weight.mul_(2.0)  # what an optimizer step does
    second = variant.weight_norm(layer, "default")
    assert second is not first and not torch.allclose(second, first)
    # oracle: PEFT's layout, restated in float64 (B read as (out/groups, r), the product in W's shape)
    w = layer.get_base_layer().weight.double()
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    delta = (b.reshape(-1, 8) @ a.reshape(8, -1)).reshape(w.shape) * layer.scaling["default"]
    torch.testing.assert_close(second.double(), (w + delta).flatten(1).norm(dim=1), atol=1e-6, rtol=1e-6)


def test_training_with_dropout_matches_peft_step_by_step():
    options = dict(OPTIONS, lora_dropout=0.25)
    with pytest.warns(UserWarning, match="groups > 1"):
        theirs = peft.get_peft_model(fresh("Conv2dGroups"), peft.LoraConfig(**options))
    ours = get_peft_model(fresh("Conv2dGroups"), LoraConfig(**options))
    randomize_adapters(theirs, scale=0.3)
    copy_params(theirs, ours)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, theirs)]
    for step in range(3):
        losses = []
        for model, opt in zip((ours, theirs), opts):
            torch.manual_seed(step)  # the same dropout masks on both sides
            loss = model(X).exp().square().sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, theirs_params[name], atol=1e-5, rtol=1e-4, msg=name)
