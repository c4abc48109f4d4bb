"""PiSSA, OLoRA, orthogonal and LoftQ starts, and PEFT's conversion to a plain LoRA adapter."""

from __future__ import annotations

import json

import peft
import pytest
import torch

from loracast import ConfigError, LoraConfig, PeftModel, get_peft_model
from loracast.quant.loftq import quantize_roundtrip
from tests.support.models import tiny_llama_config

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj"]


def llama(dtype=torch.float32):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).to(dtype).eval()


def _layers(model):
    return [m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj")) and hasattr(m, "lora_A")]


def start_error(layer, original: torch.Tensor, norm: bool = False) -> float:
    """max |W_res + s * B @ A - W| (or its Frobenius norm), in float64: how far the adapted layer
    starts from the original weight."""
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    difference = layer.base_layer.weight.double() + layer.scaling["default"] * (b @ a) - original.double()
    return difference.norm().item() if norm else difference.abs().max().item()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_fp32_start_equals_peft_and_the_original_model(init):
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    expected = llama()(input_ids=IDS).logits
    ours = get_peft_model(llama(), LoraConfig(**config)).eval()
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(**config)).eval()
    for mine, other in zip(_layers(ours), _layers(theirs), strict=True):
        # oracle: PEFT's float32 decomposition; singular vectors may flip sign in pairs, so the
        # product s * B @ A and the residual are compared, at float32 resolution
        product = mine.lora_B["default"].weight @ mine.lora_A["default"].weight
        torch.testing.assert_close(product, other.lora_B["default"].weight @ other.lora_A["default"].weight,
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.base_layer.weight, other.base_layer.weight, rtol=1e-4, atol=1e-5)
    # oracle: the unadapted model; the start differs by one float32 rounding of the residual
    torch.testing.assert_close(ours(input_ids=IDS).logits, expected, rtol=1e-4, atol=1e-5)
    # a training step moves the factors only (the residual base stays frozen)
    ours.train()
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    ours(input_ids=IDS, labels=IDS).loss.backward()
    trained = [p for n, p in ours.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    torch.optim.SGD(trained, lr=0.1).step()
    assert all(torch.equal(p, frozen[n]) for n, p in ours.named_parameters() if n in frozen)


@pytest.mark.parametrize("init, flag, dtype", [("pissa", True, torch.bfloat16), ("olora", False, torch.bfloat16),
                                               ("pissa", False, torch.float16)])
def test_half_precision_start_is_one_rounding_from_the_original(init, flag, dtype):
    original = {n: m.weight.detach().clone() for n, m in llama(dtype).named_modules()
                if n.endswith(("q_proj", "v_proj"))}
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    ours = get_peft_model(llama(dtype), LoraConfig(**config), autocast_adapter_dtype=flag)
    theirs = peft.get_peft_model(llama(dtype), peft.LoraConfig(**config), autocast_adapter_dtype=flag)
    for name, mine, other in zip(original, _layers(ours), _layers(theirs), strict=True):
        assert mine.base_layer.weight.dtype == dtype
        assert mine.lora_A["default"].weight.dtype == (torch.float32 if flag else dtype)
        # oracle: the original weight, exact in float64. Ours is off by the one rounding of the
        # residual (at most half an ulp); PEFT rounds its factors to the base dtype after computing
        # the residual from them unrounded (also with fp32 adapters: they are upcast afterwards),
        # which adds an error of its own
        mantissa = 8 if dtype == torch.bfloat16 else 11
        half_ulp = mine.base_layer.weight.double().abs().max().item() * 2.0 ** -mantissa
        assert start_error(mine, original[name]) <= half_ulp
        assert start_error(mine, original[name], norm=True) < 0.9 * start_error(other, original[name], norm=True)


def test_pissa_niter_and_orthogonal():
    base_weight = llama().model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_4"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert start_error(layer, base_weight) < 1e-6  # oracle: the original fp32 weight; one fp32 rounding
    model = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="orthogonal"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.base_layer.weight, base_weight)  # the base is not touched
    product = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert product.abs().max() < 1e-6 and layer.lora_A["default"].weight.abs().max() > 1e-3
    with pytest.raises(ConfigError, match="even rank"):
        get_peft_model(llama(), LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights="orthogonal"))
    with pytest.raises(ConfigError, match="linear layers"):
        get_peft_model(llama(), LoraConfig(target_modules=["embed_tokens"], init_lora_weights="pissa"))
    with pytest.raises(ConfigError, match="init_lora_weights"):
        LoraConfig(init_lora_weights="pissa_niter_x")


def test_loftq_start_on_a_4bit_base_beats_plain_4bit(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    original = llama()
    exact = original(input_ids=IDS).logits
    original.save_pretrained(tmp_path / "original")
    config = LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights="loftq",
                        loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    model = get_peft_model(llama(), config)
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach()
    # the new base already lies on bitsandbytes' NF4 grid: quantizing it again changes nothing
    assert torch.equal(quantize_roundtrip(base, 4), base)
    # PEFT's recipe: save the adapter as a plain one, save the residual model, load it in 4 bits
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "adapter")
    model.unload().save_pretrained(tmp_path / "residual")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)

    def load_4bit(folder):
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4, device_map="cpu",
                                                    dtype=torch.float32).eval()

    loftq = PeftModel.from_pretrained(load_4bit(tmp_path / "residual"), tmp_path / "adapter")
    plain = load_4bit(tmp_path / "original")
    # oracle: the fp32 model; LoftQ on the 4-bit residual is closer to it than plain NF4 of the original
    loftq_error = (loftq(input_ids=IDS).logits - exact).abs().mean()
    plain_error = (plain(input_ids=IDS).logits - exact).abs().mean()
    assert loftq_error < 0.8 * plain_error  # measured: 0.0085 against 0.0124 (mean |logit error|)
    with pytest.raises(ConfigError, match="loftq_config"):
        LoraConfig(init_lora_weights="loftq")


def test_conversion_to_plain_lora_equals_peft_files(tmp_path):
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa")
    ours = get_peft_model(llama(), LoraConfig(**config))
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(**config))
    with torch.no_grad():  # the same start on both sides (PEFT's fp32 SVD), then the same "training"
        for (_, mine), (_, other) in zip(*(sorted((n, p) for n, p in m.named_parameters() if "lora_" in n)
                                           for m in (ours, theirs)), strict=True):
            mine.copy_(other)
    for model, name in ((ours, "ours"), (theirs, "peft")):
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(tmp_path / name / "init")
        model.peft_config["default"].init_lora_weights = "pissa"
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for (_, mine), (_, other) in zip(*(sorted((n, p) for n, p in m.named_parameters() if "lora_" in n)
                                           for m in (ours, theirs)), strict=True):
            step = torch.randn(mine.shape, generator=generator) * 0.05
            mine.add_(step)
            other.add_(step)
    trained = ours.eval()(input_ids=IDS).logits
    ours.save_pretrained(tmp_path / "ours" / "pissa")
    for model, name in ((ours, "ours"), (theirs, "peft")):
        model.save_pretrained(tmp_path / name / "lora",
                              path_initial_model_for_weight_conversion=str(tmp_path / name / "init"))
    from safetensors.torch import load_file

    mine, other = (load_file(tmp_path / n / "lora" / "adapter_model.safetensors") for n in ("ours", "peft"))
    assert mine.keys() == other.keys() and all(torch.equal(mine[k], other[k]) for k in mine)
    config_ours, config_peft = (json.loads((tmp_path / n / "lora" / "adapter_config.json").read_text())
                                for n in ("ours", "peft"))
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert config_ours[key] == config_peft[key]
    # oracle: the trained PiSSA model; the plain adapter on the untouched base gives the same
    # logits up to the fp32 rounding of the residual
    # a PiSSA adapter loads onto the original base by redoing the decomposition (as PEFT does)
    for loaded in (PeftModel.from_pretrained(llama(), tmp_path / "ours" / "lora"),
                   peft.PeftModel.from_pretrained(llama(), tmp_path / "ours" / "lora"),
                   PeftModel.from_pretrained(llama(), tmp_path / "ours" / "pissa"),
                   peft.PeftModel.from_pretrained(llama(), tmp_path / "ours" / "pissa")):
        torch.testing.assert_close(loaded.eval()(input_ids=IDS).logits, trained, rtol=1e-4, atol=1e-4)
