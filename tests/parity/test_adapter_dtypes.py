"""Adapter dtypes equal PEFT's for every base dtype x autocast flag x layer type x entry point.

Oracle: PEFT 0.21 itself, run on an identical model in the same process.
"""

from __future__ import annotations

import peft
import pytest
import torch

from loracast import LoraConfig, PeftModel, get_peft_model, resolve_adapter_dtype
from tests.support.models import LAYER_TARGETS, mixed_net, param_dtypes

BASE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def lora_dtypes(model) -> dict[str, torch.dtype]:
    return {k: v for k, v in param_dtypes(model).items() if "lora_" in k}


@pytest.mark.parametrize("layer", sorted(LAYER_TARGETS))
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", BASE_DTYPES, ids=str)
def test_get_peft_model_and_add_adapter_dtypes_equal_peft(dtype, autocast, layer):
    targets = LAYER_TARGETS[layer]
    ours = get_peft_model(mixed_net(dtype), LoraConfig(r=4, target_modules=targets),
                          autocast_adapter_dtype=autocast)
    theirs = peft.get_peft_model(mixed_net(dtype), peft.LoraConfig(r=4, target_modules=targets),
                                 autocast_adapter_dtype=autocast)
    assert lora_dtypes(ours)  # the layer really was adapted
    assert param_dtypes(ours) == param_dtypes(theirs)

    ours.add_adapter("second", LoraConfig(r=4, target_modules=targets), autocast_adapter_dtype=autocast)
    theirs.add_adapter("second", peft.LoraConfig(r=4, target_modules=targets), autocast_adapter_dtype=autocast)
    assert param_dtypes(ours) == param_dtypes(theirs)
    expected = torch.float32 if (autocast and dtype != torch.float32) else dtype
    assert set(lora_dtypes(ours).values()) == {expected}


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", BASE_DTYPES, ids=str)
def test_from_pretrained_and_load_adapter_dtypes_equal_peft(tmp_path, dtype, autocast):
    targets = [t for names in LAYER_TARGETS.values() for t in names]
    # the saved file is fp32; the in-memory dtype must follow (base dtype, flag), not the file
    saved = peft.get_peft_model(mixed_net(torch.float32), peft.LoraConfig(r=4, target_modules=targets))
    saved.save_pretrained(tmp_path)

    ours = PeftModel.from_pretrained(mixed_net(dtype), tmp_path, autocast_adapter_dtype=autocast)
    theirs = peft.PeftModel.from_pretrained(mixed_net(dtype), tmp_path, autocast_adapter_dtype=autocast)
    assert param_dtypes(ours) == param_dtypes(theirs)

    ours.load_adapter(tmp_path, "other", autocast_adapter_dtype=autocast)
    theirs.load_adapter(tmp_path, "other", autocast_adapter_dtype=autocast)
    assert param_dtypes(ours) == param_dtypes(theirs)


@pytest.mark.parametrize("dtype", BASE_DTYPES, ids=str)
def test_explicit_adapter_dtype_wins_over_flag_and_base(dtype):
    for autocast in (True, False):
        model = get_peft_model(mixed_net(dtype), LoraConfig(r=4, target_modules=["lin", "emb"]),
                               autocast_adapter_dtype=autocast, adapter_dtype=torch.bfloat16)
        assert set(lora_dtypes(model).values()) == {torch.bfloat16}


def test_precedence_is_explicit_then_flag_then_base():
    linear = torch.nn.Linear(4, 4).to(torch.float16)
    assert resolve_adapter_dtype(linear, True, torch.bfloat16) == torch.bfloat16   # explicit wins
    assert resolve_adapter_dtype(linear, True, None) == torch.float32              # flag upcasts half
    assert resolve_adapter_dtype(linear, False, None) == torch.float16             # base dtype
    assert resolve_adapter_dtype(torch.nn.Linear(4, 4).double(), True, None) == torch.float64  # never downcast


def test_adapter_dtype_accepts_names_and_rejects_unknown():
    model = get_peft_model(mixed_net(), LoraConfig(r=4, target_modules=["lin"]), adapter_dtype="bf16")
    assert set(lora_dtypes(model).values()) == {torch.bfloat16}
    with pytest.raises(ValueError, match="adapter_dtype='int8' is not a known floating dtype"):
        get_peft_model(mixed_net(), LoraConfig(r=4, target_modules=["lin"]), adapter_dtype="int8")


def test_adapters_live_on_the_base_device_meta_included():
    with torch.device("meta"):
        model = mixed_net()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["lin", "emb", "conv2d"]))
    assert {p.device.type for n, p in peft_model.named_parameters() if "lora_" in n} == {"meta"}


@pytest.mark.parametrize("autocast", [True, False])
def test_modules_to_save_copies_follow_the_rule(autocast):
    model = get_peft_model(mixed_net(torch.bfloat16),
                           LoraConfig(r=4, target_modules=["lin"], modules_to_save=["head"]),
                           autocast_adapter_dtype=autocast)
    head = model.base_model.model.head
    expected = torch.float32 if autocast else torch.bfloat16
    assert head.modules_to_save["default"].weight.dtype == expected
    assert head.original_module.weight.dtype == torch.bfloat16
    # the copy's output comes back in the base dtype, so the model stays bf16 between layers
    out = model(torch.randint(0, 32, (2, 8)))
    assert out.dtype == torch.bfloat16
    assert head.modules_to_save["default"].weight.requires_grad
