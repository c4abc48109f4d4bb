"""upcast-frozen-params on a model that is not quantized: PEFT's prepare_model_for_kbit_training on
a float16 model casts every frozen parameter to float32 while the model still declares float16
(twice the parameter memory, huggingface/peft#1149). Oracle: the parameter bytes of the float16
model, measured before the preparation; the printed fixes must bring them back exactly."""

from __future__ import annotations

import pytest
import torch

import loracast
from bnb_models import load_llama
from conftest import tiny_llama_config
from doctor_fixes import apply_fix, the
from loracast import doctor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TARGETS = ["q_proj", "v_proj"]
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(5))


def declared_llama(dtype: torch.dtype) -> torch.nn.Module:
    """A tiny Llama built from a config that declares `dtype` (as from_pretrained(dtype=...) records it)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(dtype=dtype)).to(dtype)
    assert model.config.dtype == dtype
    return model


def frozen_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Base parameter name (as in the unwrapped model) -> bytes held."""
    return {name.removeprefix("base_model.model.").replace(".base_layer", ""): p.numel() * p.element_size()
            for name, p in model.named_parameters() if "lora_" not in name}


def prepared(library: str, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    import peft

    model = peft.prepare_model_for_kbit_training(declared_llama(dtype))  # PEFT's defaults, as users call it
    if library == "peft":
        return peft.get_peft_model(model, peft.LoraConfig(target_modules=TARGETS))
    return loracast.get_peft_model(model, loracast.LoraConfig(target_modules=TARGETS))


@pytest.mark.parametrize("library", ["peft", "loracast"])
def test_an_unquantized_fp16_model_prepared_for_kbit_training_is_reported_with_its_cost(library):
    before = frozen_bytes(declared_llama(torch.float16))
    model = prepared(library)
    after = frozen_bytes(model)
    assert {p.dtype for n, p in model.named_parameters()} == {torch.float32}  # the state of the complaint
    finding = the(doctor(model), "upcast-frozen-params")
    upcast = [name for name in after if "norm" not in name]
    held = sum(after[name] for name in upcast)
    extra = held - sum(before[name] for name in upcast)
    assert extra * 2 == held  # twice the float16 bytes
    assert f"{extra / 1024:.0f} KiB more than in float16 ({held:,} bytes where float16 needs {extra:,})" in finding.title
    assert finding.title.startswith(f"{len(upcast)} frozen base parameters are float32 in a float16 model")
    assert "model.embed_tokens.weight" in finding.seen and "lm_head.weight" in finding.seen
    assert "holds no quantized layer" in finding.why and "leave it out" in finding.fix
    assert finding.severity == "warning"

    apply_fix(finding, 0, model=model)  # cast the frozen base back
    assert frozen_bytes(model) == before
    assert "upcast-frozen-params" not in doctor(model).ids
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()  # one dtype throughout: no autocast needed


def test_the_second_fix_remakes_the_model_without_the_upcast():
    finding = the(doctor(prepared("peft")), "upcast-frozen-params")
    base_model = declared_llama(torch.float16)
    before = frozen_bytes(base_model)
    namespace = apply_fix(finding, 1, base_model=base_model, config=loracast.LoraConfig(target_modules=TARGETS))
    model = namespace["model"]
    assert frozen_bytes(model) == before
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert doctor(model).findings == []


@pytest.mark.parametrize("library", ["peft", "loracast"])
def test_a_float32_model_prepared_the_same_way_reports_nothing(library):
    report = doctor(prepared(library, torch.float32))
    assert "upcast-frozen-params" not in report.ids and report.findings == []


def test_a_quantized_model_without_the_upcast_reports_nothing_and_with_it_only_its_unquantized_rest():
    model = loracast.prepare_model_for_kbit_training(load_llama(4, "bf16"), use_gradient_checkpointing=False,
                                                     upcast="none")
    model = loracast.get_peft_model(model, loracast.LoraConfig(target_modules=TARGETS))
    assert "upcast-frozen-params" not in doctor(model).ids

    import peft

    model = peft.prepare_model_for_kbit_training(load_llama(4, "bf16"), use_gradient_checkpointing=False)
    finding = the(doctor(peft.get_peft_model(model, peft.LoraConfig(target_modules=TARGETS))), "upcast-frozen-params")
    assert finding.seen == ["model.embed_tokens.weight", "lm_head.weight"]  # the 4-bit layers are not listed
    assert "holds no quantized layer" not in finding.why and "leave it out" not in finding.fix
