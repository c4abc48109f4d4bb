"""Forward and backward through frozen bitsandbytes weights.

Oracle for gradients: the same LoRA model over plain `nn.Linear` layers holding the dequantized
weights (bitsandbytes' backward multiplies by the dequantized weight), compared with
fp32-compute tolerances (1e-5). Training checks assert the loss falls, and that every adapter
receives a non-zero gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import loracast
from loracast.quant import find_backend
from tests.support.bnb_models import TwoLayer, copy_lora, float_linear, linear4bit, linear8bit, load_llama


def _dequantized_twin(model: TwoLayer) -> TwoLayer:
    """The float model with the quantized layers' weights as they compute."""
    layers = []
    for quantized in (model.first, model.second):
        dense = nn.Linear(quantized.in_features, quantized.out_features)
        with torch.no_grad():
            dense.weight.copy_(find_backend(quantized).dequantize(quantized).float())
            dense.bias.copy_(quantized.bias.float())
        layers.append(dense)
    return TwoLayer(*layers)


@pytest.mark.parametrize("make", [
    lambda src: linear4bit(src, "nf4", torch.uint8, double_quant=True),
    lambda src: linear4bit(src, "fp4", torch.float32),
    lambda src: linear8bit(src),
], ids=["nf4-uint8-double", "fp4-fp32storage", "int8"])
def test_gradients_reach_adapters_through_frozen_quantized_weights(make):
    quantized = TwoLayer(make(float_linear(seed=1)), make(float_linear(seed=2)))
    dense = _dequantized_twin(quantized)
    config = dict(r=4, target_modules=["first", "second"], init_lora_weights=False)
    ours = loracast.get_peft_model(quantized, loracast.LoraConfig(**config))
    reference = loracast.get_peft_model(dense, loracast.LoraConfig(**config))
    copy_lora(ours, reference)
    ours.train(), reference.train()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    out, ref_out = ours(x), reference(x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    ref_out.square().mean().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert set(grads) == set(ref_grads) and len(grads) == 4
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4)
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)


def _lm_step(model, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = {}
    for checkpointing in (False, True):
        model = load_llama(4, dtype="fp32", compute="fp32")
        kwargs = {"use_reentrant": reentrant}
        model = loracast.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                         gradient_checkpointing_kwargs=kwargs)
        torch.manual_seed(0)
        peft_model = loracast.get_peft_model(model, loracast.LoraConfig(r=4, target_modules="all-linear",
                                                                         init_lora_weights="gaussian"))
        with torch.no_grad():  # non-zero B, so A's gradient is non-zero too
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02, generator=torch.Generator().manual_seed(hash(name) % 2**31))
        _lm_step(peft_model, ids)
        grads[checkpointing] = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        assert model.is_activation_checkpointing == checkpointing
    assert len(grads[True]) == 2 * 7 * 2  # A and B of 7 linear layers in 2 decoder layers
    for name, grad in grads[True].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[False][name], atol=1e-6, rtol=1e-5)


def _train(model, ids, steps=20, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = _lm_step(model, ids)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_loss_falls_over_20_steps_on_a_4bit_base():
    """QLoRA recipe on a CPU: bf16 model, nf4 with double quantization, bf16 compute, checkpointing."""
    model = load_llama(4, dtype="bf16", storage="bf16", compute="bf16", double_quant=True)
    model = loracast.prepare_model_for_kbit_training(model)
    model = loracast.get_peft_model(model, loracast.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = _train(model, ids)
    # A 64-wide model with a frozen output head learns slowly; a steady fall is the signal.
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(later < earlier for earlier, later in zip(losses[::5], losses[5::5])), losses
    adapter = model.base_model.model.model.layers[0].self_attn.q_proj
    assert adapter.lora_A["default"].weight.dtype == torch.float32
    assert adapter.base_layer.weight.dtype == torch.bfloat16  # storage untouched by training (train mode)


def test_8bit_with_bf16_adapters_trains():
    model = load_llama(8, dtype="bf16")
    model = loracast.get_peft_model(model, loracast.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                                    adapter_dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in before.values()} == {torch.bfloat16}
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = _train(model, ids)
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(later < earlier for earlier, later in zip(losses[::5], losses[5::5])), losses
    after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(after[n].dtype == torch.bfloat16 and not torch.equal(after[n], before[n]) for n in before)


def test_forward_keeps_activation_dtype_and_runs_the_branch_in_adapter_dtype():
    """bf16 activations stay bf16 between layers; the LoRA branch sees its input in fp32."""
    model = load_llama(4, dtype="bf16", compute="bf16")
    model = loracast.get_peft_model(model, loracast.LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    seen = {}
    layer.lora_A["default"].register_forward_hook(lambda m, args, out: seen.update(branch_in=args[0].dtype))
    layer.register_forward_hook(lambda m, args, out: seen.update(out=out.dtype))
    model(torch.randint(0, 128, (1, 4)))
    assert seen == {"branch_in": torch.float32, "out": torch.bfloat16}


def test_eval_forward_after_cpu_repacking_matches_train_forward():
    """The in-place CPU repacking bitsandbytes does in eval mode does not confuse the LoRA layer."""
    model = loracast.get_peft_model(load_llama(4, dtype="fp32", compute="fp32"),
                                    loracast.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))
    ids = torch.randint(0, 128, (1, 6))
    model.train()
    with torch.no_grad():
        train_logits = model(ids).logits
    model.eval()
    with torch.no_grad():
        eval_logits = model(ids).logits
        again = model(ids).logits
    torch.testing.assert_close(eval_logits, train_logits, atol=5e-2, rtol=5e-2)  # absmax rounded to bf16
    torch.testing.assert_close(again, eval_logits, atol=0, rtol=0)
    assert copy.deepcopy(model) is not None


def test_per_sample_adapters_on_a_4bit_base():
    model = loracast.get_peft_model(load_llama(4, dtype="fp32", compute="fp32"),
                                    loracast.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))
    model.add_adapter("other", loracast.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.train()
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = model(ids, adapter_names=["default", "other", "__base__"]).logits
        expected = []
        for row, name in enumerate(["default", "other"]):
            model.set_adapter(name)
            expected.append(model(ids[row:row + 1]).logits)
        with model.disable_adapter():
            expected.append(model(ids[2:3]).logits)
    torch.testing.assert_close(mixed, torch.cat(expected), atol=1e-5, rtol=1e-5)
