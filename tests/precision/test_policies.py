"""Precision policies: what each preset sets, how it combines with the knobs, and FSDP for real."""

from __future__ import annotations

import pytest
import torch

from loracast import LoraConfig, PrecisionError, get_peft_model
from loracast.precision.policies import resolve_precision, uniform_flat_dtype
from loracast.precision.view import adapter_tensors_of
from tests.support.fake_quant import fake_backend, quantize  # noqa: F401  (fixture)
from tests.support.fsdp_step import fsdp1_step


def config(**extra) -> LoraConfig:
    return LoraConfig(target_modules=["q_proj", "v_proj"], **extra)


def adapter_dtypes(peft_model, roles=("A", "B")) -> set[torch.dtype]:
    return {t.tensor.dtype for t in adapter_tensors_of(peft_model.base_model.model) if t.role in roles}


@pytest.mark.parametrize("base", [torch.bfloat16, torch.float16, torch.float32])
def test_stable_and_fast_give_peft_dtypes(make_llama, base):
    import peft

    for policy, autocast in (("stable", True), ("fast", False)):
        ours = get_peft_model(make_llama(base), config(modules_to_save=["lm_head"]), precision=policy)
        theirs = peft.get_peft_model(make_llama(base), peft.LoraConfig(target_modules=["q_proj", "v_proj"]),
                                     autocast_adapter_dtype=autocast)
        peft_dtypes = {p.dtype for n, p in theirs.named_parameters() if "lora_" in n}
        assert adapter_dtypes(ours) == peft_dtypes
        # beyond PEFT: modules_to_save copies follow the same policy
        assert adapter_dtypes(ours, ("copy",)) == ({torch.float32} if policy == "stable" else {base})
        assert ours._precision_plans["default"].policy == policy


def test_knobs_without_policy_are_recorded_as_their_policy(make_llama):
    assert get_peft_model(make_llama(torch.bfloat16), config())._precision_plans["default"].policy == "stable"
    fast = get_peft_model(make_llama(torch.bfloat16), config(), autocast_adapter_dtype=False)
    assert fast._precision_plans["default"].policy == "fast"
    custom = get_peft_model(make_llama(), config(), adapter_dtype="bf16")
    assert custom._precision_plans["default"].policy == "custom"
    assert adapter_dtypes(custom) == {torch.bfloat16}


@pytest.mark.parametrize("precision, knobs", [
    ("fast", {"autocast_adapter_dtype": True}),
    ("fast", {"adapter_dtype": torch.float32}),
    ("stable", {"autocast_adapter_dtype": False}),
    ("stable", {"adapter_dtype": torch.bfloat16}),
    ("fsdp", {"adapter_dtype": torch.float32}),
    ("fsdp", {"autocast_adapter_dtype": True}),
])
def test_a_knob_that_contradicts_the_policy_is_refused(make_llama, precision, knobs):
    knob = next(iter(knobs))
    with pytest.raises(PrecisionError, match=rf"precision='{precision}' sets .* {knob}="):
        get_peft_model(make_llama(torch.bfloat16), config(), precision=precision, **knobs)


def test_a_knob_that_agrees_with_the_policy_is_accepted(make_llama):
    stable = get_peft_model(make_llama(torch.bfloat16), config(), precision="stable", adapter_dtype=torch.float32,
                            autocast_adapter_dtype=True)
    assert adapter_dtypes(stable) == {torch.float32}
    fast = get_peft_model(make_llama(torch.bfloat16), config(), precision="fast", autocast_adapter_dtype=False)
    assert adapter_dtypes(fast) == {torch.bfloat16}
    fsdp = get_peft_model(make_llama(torch.bfloat16), config(), precision="fsdp", adapter_dtype="bf16")
    assert adapter_dtypes(fsdp) == {torch.bfloat16}


def test_unknown_and_misplaced_policies_are_refused(make_llama):
    with pytest.raises(PrecisionError, match="'fastest' is not a precision policy"):
        get_peft_model(make_llama(), config(), precision="fastest")
    with pytest.raises(PrecisionError, match="applies when loading"):
        get_peft_model(make_llama(), config(), precision="match-training")
    with pytest.raises(TypeError, match="True or False"):
        resolve_precision(make_llama(), None, autocast_adapter_dtype="yes")


def test_fsdp_gives_one_dtype_to_every_parameter(make_llama):
    model = get_peft_model(make_llama(torch.bfloat16), config(modules_to_save=["lm_head"]), precision="fsdp")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert uniform_flat_dtype(model) == torch.bfloat16
    model.add_adapter("second", config(), precision="fsdp")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_fsdp_refuses_a_base_with_several_float_dtypes(make_llama):
    model = make_llama(torch.bfloat16)
    model.model.norm.float()  # as prepare_model_for_kbit_training does
    with pytest.raises(PrecisionError, match=r"20 in bfloat16 .* 1 in float32 \(e\.g\. model\.norm\.weight\)"):
        get_peft_model(model, config(), precision="fsdp")


def test_fsdp_refuses_integer_storage_and_accepts_float_storage(make_llama, fake_backend):
    packed = quantize(make_llama(torch.bfloat16), storage=torch.int8, compute=torch.bfloat16)
    with pytest.raises(PrecisionError, match=r"cannot flatten integer tensors.*bnb_4bit_quant_storage"):
        get_peft_model(packed, config(), precision="fsdp")
    carried = quantize(make_llama(torch.bfloat16), storage=torch.bfloat16, compute=torch.float32)
    model = get_peft_model(carried, config(), precision="fsdp")
    # the flat dtype wins over the layers' compute dtype: FSDP needs one dtype per unit
    assert adapter_dtypes(model) == {torch.bfloat16}


def test_add_adapter_takes_a_policy(make_llama):
    model = get_peft_model(make_llama(torch.bfloat16), config())
    model.add_adapter("fast", config(), precision="fast")
    dtypes = {t.tensor.dtype for t in adapter_tensors_of(model.base_model.model) if t.adapter == "fast"}
    assert dtypes == {torch.bfloat16}
    assert model._precision_plans["fast"].policy == "fast"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fsdp_policy_is_what_fsdp1_needs(make_llama):
    stable = get_peft_model(make_llama(torch.bfloat16), config(), precision="stable")
    with pytest.raises(ValueError, match="Must flatten tensors with uniform dtype"):
        fsdp1_step(stable)
    fsdp1_step(get_peft_model(make_llama(torch.bfloat16), config(), precision="fsdp"))
