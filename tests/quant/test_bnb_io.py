"""Adapters trained on bitsandbytes bases, saved and loaded across loracast and PEFT.

Oracle: the other library's loaded tensors equal the saved ones exactly, and both libraries give
the same logits (fp32 activations, so the forwards do the same arithmetic: tolerance 1e-6).
"""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import loracast
from tests.support.bnb_models import load_llama, lora_tensors

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model):
    model.train()  # keep bitsandbytes off its eval-only CPU repacking, the same on both sides
    with torch.no_grad():
        return model(IDS).logits


def _train_one_step(model):
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()


def _strip_adapter_name(tensors):
    return {k.replace(".default", ""): v for k, v in tensors.items()}


@pytest.mark.parametrize("bits", [4, 8])
def test_peft_loads_an_adapter_trained_by_loracast(tmp_path, bits):
    model = loracast.get_peft_model(load_llama(bits, dtype="fp32", compute="bf16"),
                                    loracast.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    _train_one_step(model)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: v.dtype for k, v in saved.items()} == {k: torch.float32 for k in saved}

    theirs = peft.PeftModel.from_pretrained(load_llama(bits, dtype="fp32", compute="bf16"), tmp_path)
    assert lora_tensors(theirs).keys() == lora_tensors(model).keys()
    for name, value in lora_tensors(model).items():
        assert torch.equal(lora_tensors(theirs)[name], value), name
    torch.testing.assert_close(_logits(theirs), _logits(model), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("autocast", [True, False])
def test_loracast_loads_an_adapter_trained_by_peft(tmp_path, autocast):
    theirs = peft.get_peft_model(load_llama(4, dtype="fp32", compute="bf16"),
                                 peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                                 autocast_adapter_dtype=autocast)
    _train_one_step(theirs)
    theirs.save_pretrained(tmp_path)

    ours = loracast.PeftModel.from_pretrained(load_llama(4, dtype="fp32", compute="bf16"), tmp_path,
                                              autocast_adapter_dtype=autocast)
    expected_dtype = torch.float32 if autocast else torch.bfloat16  # compute dtype, as PEFT
    assert {p.dtype for p in lora_tensors(ours).values()} == {expected_dtype}
    saved = _strip_adapter_name(lora_tensors(theirs))
    assert _strip_adapter_name(lora_tensors(ours)).keys() == saved.keys()
    for name, value in _strip_adapter_name(lora_tensors(ours)).items():
        assert torch.equal(value, saved[name]), name
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-6, rtol=1e-6)
