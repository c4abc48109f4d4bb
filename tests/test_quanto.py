"""LoRA on optimum-quanto layers (frozen `QLinear` with qint8/qint4/qint2 weights, on the CPU).

Oracles: PEFT 0.21.2, which adapts a `QLinear` as the `nn.Linear` it subclasses, for adapter
dtypes, forward outputs, gradients and adapter files (both directions); quanto's own `quantize` and
`freeze` applied to the exact merged weight (the requantized layer must hold exactly what quanto
makes of it); a float64 reference ``W + B @ A * scaling`` built by hand for the reported rounding
error; the packed tensors copied before a merge (unmerge must give them back with 0 elements
changed).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("optimum.quanto")  # an optional dependency: `pip install 'loracast[quanto]'`
peft = pytest.importorskip("peft")

import loracast  # noqa: E402
from bnb_models import copy_lora  # noqa: E402
from loracast import ConfigError, LoracastError, LoraConfig, RequantizationWarning, get_peft_model  # noqa: E402
from loracast.layers import LoraLayer  # noqa: E402
from loracast.layers.merge import exact_sum  # noqa: E402
from loracast.quant import find_backend  # noqa: E402
from loracast.quant.merge import requantization_record  # noqa: E402
from quant_adapters import one_layer_config, peft_one_layer_config, randomize_b  # noqa: E402
from quanto_models import DTYPES, QTYPES, load_llama, packed, quanto_model, same_packed  # noqa: E402


@pytest.mark.parametrize("qtype", ["qint8", "qint4"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_follows_the_compute_dtype_rule_as_peft(qtype, dtype, autocast):
    ours = get_peft_model(quanto_model(qtype, DTYPES[dtype]), one_layer_config(), autocast_adapter_dtype=autocast)
    theirs = peft.get_peft_model(quanto_model(qtype, DTYPES[dtype]), peft_one_layer_config(), autocast_adapter_dtype=autocast)
    layer = ours.base_model.model[0]
    assert find_backend(layer.base_layer).name == "quanto"
    expected = torch.float32 if autocast else DTYPES[dtype]  # fp32 adapters by default, else the compute dtype
    assert layer.lora_A["default"].weight.dtype == expected
    assert theirs.base_model.model[0].lora_A["default"].weight.dtype == expected


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_outputs_and_gradients_equal_peft(qtype, dtype):
    """Oracle: PEFT's LoRA Linear over the same QLinear with the same LoRA values; 1e-5 relative (float32)."""
    ours = get_peft_model(quanto_model(qtype, DTYPES[dtype]), one_layer_config())
    theirs = peft.get_peft_model(quanto_model(qtype, DTYPES[dtype]), peft_one_layer_config())
    randomize_b(ours.base_model.model[0], 1)
    copy_lora(ours, theirs)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype])
    out_ours, out_theirs = ours(x), theirs(x)
    assert out_ours.dtype == out_theirs.dtype == DTYPES[dtype]
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == "fp32" else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(out_ours, out_theirs, **tolerance)
    out_ours.float().square().sum().backward()
    out_theirs.float().square().sum().backward()
    grads_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    grads_ours = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads_ours.keys() == grads_theirs.keys() and len(grads_ours) == 2
    for name, grad in grads_ours.items():
        torch.testing.assert_close(grad, grads_theirs[name], **tolerance)


def test_adapter_files_load_both_ways_with_equal_outputs(tmp_path):
    """Oracle: each library's own outputs on the same quanto base (float32, so equal within 1e-5)."""
    ours = get_peft_model(quanto_model("qint4"), one_layer_config(init_lora_weights="gaussian"))
    randomize_b(ours.base_model.model[0], 2)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ours(x)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(quanto_model("qint4"), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-6)

    source = peft.get_peft_model(quanto_model("qint4"), peft_one_layer_config(init_lora_weights="gaussian"))
    with torch.no_grad():
        source.base_model.model[0].lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(3))
        expected = source(x)
    source.save_pretrained(tmp_path / "theirs")
    loaded = loracast.PeftModel.from_pretrained(quanto_model("qint4"), tmp_path / "theirs")
    assert find_backend(loaded.base_model.model[0].base_layer).name == "quanto"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merge_requantizes_the_exact_sum_and_unmerge_restores_every_element(qtype, dtype):
    model = get_peft_model(quanto_model(qtype, DTYPES[dtype]), one_layer_config())
    lora = model.base_model.model[0]
    base = lora.base_layer
    randomize_b(lora, 4)
    before, original_weight = packed(base), base.weight
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).to(DTYPES[dtype])
    with torch.no_grad():
        unmerged = model(x)
    exact = exact_sum(base.weight.dequantize(), [lora.get_delta_weight("default")])

    with pytest.warns(RequantizationWarning, match=r"max \|error\| [0-9.e-]+ \(in a QLinear .*rms adapter delta"):
        model.merge_adapter()
    # oracle: quanto's own quantize (and freeze) on the exact merged weight
    reference = quanto_model(qtype, DTYPES[dtype], weight=exact)[0]
    assert same_packed(base, packed(reference))
    with torch.no_grad():
        merged = model(x)
    assert not torch.equal(merged, unmerged)

    model.merge_adapter()  # merging again is a no-op
    assert same_packed(base, packed(reference))
    model.unmerge_adapter()
    assert base.weight is original_weight
    assert same_packed(base, before)  # 0 elements changed
    assert requantization_record(base) is None
    with torch.no_grad():
        assert torch.equal(model(x), unmerged)


@pytest.mark.parametrize("qtype", ["qint8", "qint4"])
def test_reported_error_is_the_rounding_against_a_float64_reference(qtype):
    """Oracle: W0 + B @ A * scaling in float64, built by hand from the dequantized base; the error of
    each element is at most half a quantization step of its row (qint8: symmetric, scale per row) or
    one step (qint4: scale and shift per group)."""
    model = get_peft_model(quanto_model(qtype), one_layer_config())
    lora = model.base_model.model[0]
    base = lora.base_layer
    randomize_b(lora, 5)
    a, b = lora.lora_A["default"].weight.detach().double(), lora.lora_B["default"].weight.detach().double()
    reference = base.weight.dequantize().double() + (b @ a) * lora.scaling["default"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        model.merge_adapter()
    error = base.weight.dequantize().double() - reference
    record = requantization_record(base)
    assert record.max_abs == pytest.approx(float(error.abs().max()), rel=1e-5, abs=1e-7)
    assert record.rms == pytest.approx(float(error.pow(2).mean().sqrt()), rel=1e-4)
    assert record.delta_rms == pytest.approx(float(((b @ a) * lora.scaling["default"]).pow(2).mean().sqrt()), rel=1e-5)
    scale = base.weight._scale.double().abs()
    step = scale.reshape(48, -1).repeat_interleave(64 // scale.reshape(48, -1).shape[1], dim=1)
    bound = step / 2 if qtype == "qint8" else step
    assert bool((error.abs() <= bound * (1 + 1e-5) + 1e-7).all())
    assert record.max_abs > 0


def test_merge_and_unload_gives_a_quanto_model_that_runs():
    model = get_peft_model(quanto_model("qint4"), one_layer_config())
    randomize_b(model.base_model.model[0], 6)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        model.merge_adapter()
        with torch.no_grad():
            merged = model(x)
        plain = model.merge_and_unload()
    assert find_backend(plain[0]).name == "quanto" and type(plain[0].weight).__name__ == "WeightQBitsTensor"
    assert requantization_record(plain[0]) is not None  # the doctor still sees the rounding
    with torch.no_grad():
        assert torch.equal(plain(x), merged)


def test_errors_inside_quanto_come_out_as_loracast_errors_and_leave_the_layer_as_it_was():
    model = get_peft_model(quanto_model("qint4"), one_layer_config())
    lora = model.base_model.model[0]
    randomize_b(lora, 8)
    before, original_weight = packed(lora.base_layer), lora.base_layer.weight
    lora.base_layer.weight_group_size = 7  # a group size quanto refuses (64 inputs are not groups of 7)
    with pytest.raises(LoracastError, match=r"quanto failed to requantize the merged weight of QLinear qint4 "
                                            r"\(48x64\): .*keep the adapter unmerged") as caught:
        model.merge_adapter()
    assert "\n" not in str(caught.value)
    assert lora.base_layer.weight is original_weight and same_packed(lora.base_layer, before)
    assert not lora.merged


@pytest.mark.parametrize("frozen,activations", [(False, False), (False, True), (True, True)])
def test_unfrozen_and_activation_quantized_layers_are_refused_in_one_line(frozen, activations):
    from optimum.quanto import freeze, qint8, quantize

    model = nn.Sequential(nn.Linear(64, 48))
    quantize(model, weights=qint8, activations=qint8 if activations else None)
    if frozen:
        freeze(model)
    with pytest.raises(ConfigError, match=r"optimum\.quanto.*, a quantized (layer|tensor type) loracast does not "
                                          r"adapt\. loracast adapts frozen optimum-quanto QLinear layers with "
                                          r"quantized weights only: call freeze\(model\)") as caught:
        get_peft_model(model, one_layer_config())
    assert "\n" not in str(caught.value)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_a_llama_trains_merges_and_unmerges():
    """quanto's quantize and freeze on the tiny Llama: one training step gives finite adapter gradients,
    a merge requantizes every adapted layer, an unmerge restores every packed tensor."""
    model = get_peft_model(load_llama("qint4", "bf16"), LoraConfig(target_modules="all-linear"))
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    before = [packed(m.base_layer) for m in layers]
    for m in layers:
        randomize_b(m, 9, std=0.02)
    with pytest.warns(RequantizationWarning, match=f"merging into {len(layers)} quantized layer"):
        model.merge_adapter()
    model.unmerge_adapter()
    assert all(same_packed(m.base_layer, b) for m, b in zip(layers, before))


def test_kbit_preparation_sees_a_quanto_model_as_quantized_and_leaves_its_codes():
    model = load_llama("qint8", "bf16")
    codes = packed(model.model.layers[0].mlp.down_proj)
    model = loracast.prepare_model_for_kbit_training(model)
    assert model.is_activation_checkpointing  # turned on for quantized models only
    # nothing upcast: the layers compute in bf16 and refuse float32 activations from float32 norms
    assert model.model.norm.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16
    assert same_packed(model.model.layers[0].mlp.down_proj, codes)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16  # still the compute dtype
    model = get_peft_model(model, LoraConfig(target_modules="all-linear")).train()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
