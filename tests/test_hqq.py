"""LoRA on HQQ-quantized layers (`HQQLinear`, hqq's pure-PyTorch backend on the CPU; 8, 4 and 2 bits).

Oracles: PEFT 0.21.2's `HqqLoraLinear` for adapter dtypes, forward outputs, gradients and adapter
files (both directions); hqq's own `HQQLinear.quantize` applied to the exact merged weight (the
requantized layer must hold exactly what hqq makes of it); a float64 reference
``W + B @ A * scaling`` built by hand for the reported rounding error; the packed tensors copied
before a merge (unmerge must give them back with 0 elements changed).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("hqq")  # an optional dependency: `pip install 'loracast[hqq]'`
peft = pytest.importorskip("peft")

import loracast  # noqa: E402
from bnb_models import copy_lora  # noqa: E402
from hqq_models import BITS, DTYPES, hqq_linear, load_llama, packed, same_packed  # noqa: E402
from loracast import LoracastError, LoraConfig, RequantizationWarning, get_peft_model  # noqa: E402
from loracast.layers import LoraLayer  # noqa: E402
from loracast.layers.merge import exact_sum  # noqa: E402
from loracast.quant import find_backend  # noqa: E402
from loracast.quant.merge import requantization_record  # noqa: E402
from quant_adapters import one_layer_config, peft_one_layer_config, randomize_b  # noqa: E402


def _wrap(layer: nn.Module):
    model = get_peft_model(nn.Sequential(layer), one_layer_config())
    return model, model.base_model.model[0]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_follows_the_compute_dtype_rule(dtype, autocast):
    """fp32 adapters by default, as PEFT; with the flag off the layer's compute dtype, where PEFT 0.21.2
    keeps float32 (an `HQQLinear` has no `weight` for its dtype lookup)."""
    ours = get_peft_model(nn.Sequential(hqq_linear(4, DTYPES[dtype])), one_layer_config(), autocast_adapter_dtype=autocast)
    theirs = peft.get_peft_model(nn.Sequential(hqq_linear(4, DTYPES[dtype])), peft_one_layer_config(),
                                 autocast_adapter_dtype=autocast)
    layer = ours.base_model.model[0]
    assert find_backend(layer.base_layer).name == "hqq"
    assert layer.lora_A["default"].weight.dtype == (torch.float32 if autocast else DTYPES[dtype])
    assert theirs.base_model.model[0].lora_A["default"].weight.dtype == torch.float32
    assert type(theirs.base_model.model[0]).__name__ == "HqqLoraLinear"


@pytest.mark.parametrize("nbits", BITS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_outputs_and_gradients_equal_peft(nbits, dtype):
    """Oracle: PEFT's HqqLoraLinear with the same LoRA values; tolerance 1e-5 relative (float32)."""
    ours = get_peft_model(nn.Sequential(hqq_linear(nbits, DTYPES[dtype])), one_layer_config())
    theirs = peft.get_peft_model(nn.Sequential(hqq_linear(nbits, DTYPES[dtype])), peft_one_layer_config())
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
    """Oracle: each library's own outputs on the same HQQ base (float32, so equal within 1e-5)."""
    ours = get_peft_model(nn.Sequential(hqq_linear()), one_layer_config(init_lora_weights="gaussian"))
    randomize_b(ours.base_model.model[0], 2)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ours(x)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(nn.Sequential(hqq_linear()), tmp_path / "ours")
    assert type(theirs.base_model.model[0]).__name__ == "HqqLoraLinear"
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-6)

    source = peft.get_peft_model(nn.Sequential(hqq_linear()), peft_one_layer_config(init_lora_weights="gaussian"))
    with torch.no_grad():
        source.base_model.model[0].lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(3))
        expected = source(x)
    source.save_pretrained(tmp_path / "theirs")
    loaded = loracast.PeftModel.from_pretrained(nn.Sequential(hqq_linear()), tmp_path / "theirs")
    assert find_backend(loaded.base_model.model[0].base_layer).name == "hqq"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nbits", BITS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merge_requantizes_the_exact_sum_and_unmerge_restores_every_element(nbits, dtype):
    base = hqq_linear(nbits, DTYPES[dtype])
    model, lora = _wrap(base)
    randomize_b(lora, 4)
    before, original_codes = packed(base), base.W_q
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).to(DTYPES[dtype])
    with torch.no_grad():
        unmerged = model(x)
    exact = exact_sum(base.dequantize(), [lora.get_delta_weight("default")])

    with pytest.warns(RequantizationWarning, match=r"max \|error\| [0-9.e-]+ \(in a HQQLinear .*rms adapter delta"):
        model.merge_adapter()
    assert lora.base_layer is base  # requantized in place, the same layer object
    # oracle: hqq's own quantizer, with the layer's quant_config, on the exact merged weight
    from hqq.core.quantize import HQQLinear
    reference = HQQLinear(None, {**base.quant_config, "offload_meta": False}, compute_dtype=DTYPES[dtype],
                          device="cpu", initialize=False)
    reference.quantize(exact.clone(), **base.quant_config)
    reference.bias = base.bias
    assert same_packed(base, packed(reference))
    with torch.no_grad():
        merged = model(x)
    assert not torch.equal(merged, unmerged)

    model.merge_adapter()  # merging again is a no-op
    assert same_packed(base, packed(reference))
    model.unmerge_adapter()
    assert base.W_q is original_codes
    assert same_packed(base, before)  # 0 elements changed
    assert requantization_record(base) is None
    with torch.no_grad():
        assert torch.equal(model(x), unmerged)


@pytest.mark.parametrize("nbits", [8, 4])
def test_reported_error_is_the_rounding_against_a_float64_reference(nbits):
    """Oracle: W0 + B @ A * scaling in float64, built by hand from the dequantized base; the error of
    each element is at most one quantization step of its group (HQQ optimizes its zero points, so not
    half a step)."""
    base = hqq_linear(nbits)
    model, lora = _wrap(base)
    randomize_b(lora, 5)
    a, b = lora.lora_A["default"].weight.detach().double(), lora.lora_B["default"].weight.detach().double()
    reference = base.dequantize().double() + (b @ a) * lora.scaling["default"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        model.merge_adapter()
    error = base.dequantize().double() - reference
    record = requantization_record(base)
    assert record.max_abs == pytest.approx(float(error.abs().max()), rel=1e-5, abs=1e-7)
    assert record.rms == pytest.approx(float(error.pow(2).mean().sqrt()), rel=1e-4)
    assert record.delta_rms == pytest.approx(float(((b @ a) * lora.scaling["default"]).pow(2).mean().sqrt()), rel=1e-5)
    step = base.meta["scale"].double().abs().reshape(-1, 1).expand(-1, 32).reshape(48, 64)  # each element's step
    assert bool((error.abs() <= step * (1 + 1e-5) + 1e-7).all())
    assert record.max_abs > 0


def test_merge_and_unload_gives_an_hqq_model_that_runs():
    base = hqq_linear()
    model, lora = _wrap(base)
    randomize_b(lora, 6)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        model.merge_adapter()
        with torch.no_grad():
            merged = model(x)
        plain = model.merge_and_unload()
    assert plain[0] is base and find_backend(plain[0]).name == "hqq"
    assert requantization_record(plain[0]) is not None  # the doctor still sees the rounding
    with torch.no_grad():
        assert torch.equal(plain(x), merged)


def test_errors_inside_hqq_come_out_as_loracast_errors_and_leave_the_layer_as_it_was():
    base = hqq_linear()
    model, lora = _wrap(base)
    randomize_b(lora, 8)
    before = packed(base)
    base.quant_config["weight_quant_params"]["nbits"] = 7  # a width hqq refuses (an AssertionError inside hqq)
    with pytest.raises(LoracastError, match=r"hqq failed to requantize the merged weight of HQQLinear 7-bit group 32 "
                                            r"\(48x64\): AssertionError.*keep the adapter unmerged") as caught:
        model.merge_adapter()
    assert "\n" not in str(caught.value)
    assert same_packed(base, before) and not lora.merged
    unready = hqq_linear()
    unready.ready = False
    with pytest.raises(LoracastError, match="is not quantized yet"):
        find_backend(unready).dequantize(unready)


def test_a_llama_trains_merges_and_unmerges():
    """loracast's hqq.quantize_base: one training step gives finite adapter gradients, a merge
    requantizes every adapted layer, an unmerge restores every packed tensor."""
    model = get_peft_model(load_llama(4, "bf16"), LoraConfig(target_modules="all-linear"))
    assert find_backend(model.base_model.model.lm_head) is None  # the output head stays float
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


def test_kbit_preparation_sees_an_hqq_model_as_quantized_and_leaves_its_codes():
    model = load_llama(4, "bf16")
    codes = packed(model.model.layers[0].mlp.down_proj)
    model = loracast.prepare_model_for_kbit_training(model)
    assert model.is_activation_checkpointing  # turned on for quantized models only
    # nothing upcast: the layers compute in bf16 and refuse float32 activations from float32 norms
    assert model.model.norm.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16
    assert same_packed(model.model.layers[0].mlp.down_proj, codes)
    model = get_peft_model(model, LoraConfig(target_modules="all-linear")).train()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
