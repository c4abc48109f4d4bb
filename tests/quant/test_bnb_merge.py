"""Merging into bitsandbytes layers and unmerging them bit for bit.

Oracles: bitsandbytes' own quantizers applied to the exact merged weight (our requantized layer
must hold exactly what `quantize_4bit` / `int8_vectorwise_quant` make of it), and the packed
storage bytes taken before the merge (unmerge must give them back unchanged).
"""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes import functional as bnb_f

import loracast
from loracast import RequantizationWarning
from loracast.layers.merge import exact_sum
from tests.support.bnb_models import DTYPES, float_linear, linear4bit, linear8bit, load_llama, packed_bytes


def _wrap(layer, **config):
    model = torch.nn.Sequential(layer)
    config = dict(dict(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False), **config)
    wrapped = loracast.get_peft_model(model, loracast.LoraConfig(**config))
    return wrapped, wrapped.base_model.model[0]


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
@pytest.mark.parametrize("storage", ["uint8", "bf16", "fp16", "fp32"])
def test_4bit_merge_requantizes_the_exact_sum_and_unmerge_restores_the_bytes(quant_type, double_quant, storage):
    base = linear4bit(float_linear(), quant_type, DTYPES[storage], double_quant, weight_dtype=torch.bfloat16)
    wrapped, lora = _wrap(base)
    before = packed_bytes(base)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged_out = wrapped(x)
    original = bnb_f.dequantize_4bit(base.weight.data, base.weight.quant_state)
    exact = exact_sum(original, [lora.get_delta_weight("default")])

    with pytest.warns(RequantizationWarning, match=r"max \|error\| [0-9.e-]+ .*rms adapter delta"):
        wrapped.merge_adapter()
    merged_layer = lora.base_layer
    expected, expected_state = bnb_f.quantize_4bit(exact, blocksize=base.weight.blocksize,
                                                   compress_statistics=double_quant, quant_type=quant_type,
                                                   quant_storage=DTYPES[storage])
    assert merged_layer.weight.dtype == DTYPES[storage]
    assert torch.equal(merged_layer.weight.data.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(merged_layer.weight.quant_state.absmax, expected_state.absmax)
    assert wrapped.merge_restore_nbytes() >= base.weight.data.numel() * base.weight.data.element_size()
    with torch.no_grad():
        merged_out = wrapped(x)
    assert not torch.equal(merged_out, unmerged_out)
    torch.testing.assert_close(merged_out, unmerged_out, atol=0.5, rtol=0)  # 4-bit rounding of W + delta

    wrapped.unmerge_adapter()
    assert lora.base_layer.weight is base.weight
    assert packed_bytes(lora.base_layer) == before
    with torch.no_grad():
        assert torch.equal(wrapped(x), unmerged_out)
    assert wrapped.merge_restore_nbytes() == 0


def test_merge_reads_and_unmerge_restores_the_cpu_packed_layout():
    """bitsandbytes repacks a 4-bit weight in place on its first eval forward on an AVX512-BF16 CPU."""
    base = linear4bit(float_linear(), "nf4", torch.bfloat16, double_quant=True, weight_dtype=torch.bfloat16)
    if not base.support_avx512bf16_for_cpu:
        pytest.skip("this CPU lacks AVX512-BF16, so bitsandbytes never repacks (the layout cannot occur here)")
    wrapped, lora = _wrap(base)
    # Oracle: repacking keeps the 4-bit codes and rounds the (de-nested) block scales to bf16.
    state = base.weight.quant_state
    scales = (bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset).bfloat16().float()
    oracle = bnb_f.dequantize_4bit(base.weight.data.clone(), bnb_f.QuantState(
        absmax=scales, shape=state.shape, code=state.code, blocksize=state.blocksize, quant_type="nf4",
        dtype=state.dtype))
    wrapped.eval()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged_out = wrapped(x)
    assert base.weight.quant_state.packing_format_for_cpu and base.weight.dtype == torch.uint8
    before = packed_bytes(base)
    computed_weight = lora.quant_backend.dequantize(base)
    assert torch.equal(computed_weight, oracle)
    # and within one bf16 step of what the packed kernel multiplies by
    eye = torch.eye(64, dtype=torch.bfloat16)
    kernel_weight = bnb_f.gemv_4bit(eye, base.weight.data, state=base.weight.quant_state).T
    torch.testing.assert_close(computed_weight.to(torch.bfloat16), kernel_weight, atol=0, rtol=2**-7)

    with pytest.warns(RequantizationWarning):
        wrapped.merge_adapter()
    exact = exact_sum(computed_weight, [lora.get_delta_weight("default")])
    expected, _ = bnb_f.quantize_4bit(exact, compress_statistics=True, quant_type="nf4",
                                      quant_storage=torch.bfloat16)
    merged_weight = lora.base_layer.weight
    assert torch.equal(merged_weight.data.view(torch.uint8), expected.view(torch.uint8))
    wrapped.unmerge_adapter()
    assert packed_bytes(lora.base_layer) == before
    with torch.no_grad():
        assert torch.equal(wrapped(x), unmerged_out)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_8bit_merge_requantizes_the_exact_sum_and_unmerge_restores_the_bytes(threshold):
    base = linear8bit(float_linear(), threshold=threshold)
    wrapped, lora = _wrap(base)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    wrapped.train()
    with torch.no_grad():
        unmerged_out = wrapped(x)  # moves CB/SCB from the weight into the layer's matmul state
    before = packed_bytes(base)
    original = bnb_f.int8_vectorwise_dequant(base.weight.data, base.state.SCB)
    exact = exact_sum(original, [lora.get_delta_weight("default")])
    with pytest.warns(RequantizationWarning, match="1 quantized layer"):
        wrapped.merge_adapter()
    expected_cb, expected_scb, _ = bnb_f.int8_vectorwise_quant(exact.to(torch.float16))
    assert torch.equal(lora.base_layer.weight.data, expected_cb)
    assert torch.equal(lora.base_layer.weight.SCB, expected_scb)
    with torch.no_grad():
        merged_out = wrapped(x)
    torch.testing.assert_close(merged_out, unmerged_out, atol=5e-2, rtol=0)
    wrapped.unmerge_adapter()
    assert lora.base_layer.weight is base.weight and lora.base_layer.state.SCB is not None
    assert packed_bytes(lora.base_layer) == before
    with torch.no_grad():
        assert torch.equal(wrapped(x), unmerged_out)


def test_model_merge_warns_once_and_reports_the_error():
    model = loracast.get_peft_model(load_llama(4), loracast.LoraConfig(r=4, target_modules="all-linear",
                                                                         init_lora_weights=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
    requant = [w for w in caught if issubclass(w.category, RequantizationWarning)]
    assert len(requant) == 1
    assert "merging into 14 quantized layer(s)" in str(requant[0].message)
    assert requant[0].filename == __file__  # points at the caller, not at loracast


def test_disable_adapter_while_merged_restores_the_base_exactly():
    model = loracast.get_peft_model(load_llama(4), loracast.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                         init_lora_weights=False))
    base_layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    before = packed_bytes(base_layer)
    model.train()
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(ids).logits
        with pytest.warns(RequantizationWarning):
            model.merge_adapter()
        with pytest.warns(RequantizationWarning):  # re-merged once at the end of the block: one warning
            with model.disable_adapter():
                assert packed_bytes(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer) == before
                assert torch.equal(model(ids).logits, base_logits)


def test_merge_and_unload_leaves_quantized_layers_with_the_merged_weights():
    model = loracast.get_peft_model(load_llama(4, dtype="fp32", compute="fp32"),
                                    loracast.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))
    model.train()
    ids = torch.randint(0, 128, (1, 6))
    with pytest.warns(RequantizationWarning):
        model.merge_adapter()
    with torch.no_grad():
        merged_logits = model(ids).logits
    plain = model.merge_and_unload()
    assert isinstance(plain.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not any("lora_" in name for name, _ in plain.named_parameters())
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, merged_logits)


@pytest.mark.parametrize("bits", [4, 8])
def test_merged_quantized_model_saves_and_reloads_with_transformers(tmp_path, bits):
    from transformers import AutoModelForCausalLM

    model = loracast.get_peft_model(load_llama(bits, dtype="fp32", compute="fp32"),
                                    loracast.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 128, (1, 6))
    with pytest.warns(RequantizationWarning):
        plain = model.merge_and_unload()
    plain.train()
    with torch.no_grad():
        merged_logits = plain(ids).logits
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu").train()
    layer = reloaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, merged_logits)
