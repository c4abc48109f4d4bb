"""The doctor on the frozen base and quantized layers, in states users reported: each test builds
the state (with PEFT where PEFT produces it, and with loracast), runs the doctor, applies the
printed fix and shows the failing step succeeding: a forward outside autocast, the memory back,
outputs equal to the unmerged model's, finite outputs."""

from __future__ import annotations

import pytest
import torch

import loracast
from loracast import doctor
from tests.support.bnb_models import TwoLayer, _saved_llama, float_linear, linear8bit, load_llama
from tests.support.doctor_fixes import apply_fix, the

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(5))
TARGETS = ["q_proj", "v_proj"]


def base_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)


def forward(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def randomize_b(model, scale: float = 0.2, seed: int = 1, a_scale: float | None = None) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name or ("lora_A" in name and a_scale is not None):
            value = scale if "lora_B" in name else a_scale
            param.data = (torch.randn(param.shape, generator=generator) * value).to(param.dtype)


@pytest.mark.parametrize("library", ["peft", "loracast"])
def test_upcast_frozen_parameters_are_reported_with_their_cost_and_cast_back(library):
    """prepare_model_for_kbit_training on a half-precision model upcasts every frozen unquantized
    parameter to fp32 (huggingface/peft#816, #1149: more memory with QLoRA than with bf16 LoRA;
    bitsandbytes-foundation/bitsandbytes#1569). Here on a plain bf16 model: the whole model doubles.
    Oracle: the parameter bytes, which the fix must bring back to the bf16 model's exactly."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_saved_llama(False), dtype=torch.bfloat16)  # declares bfloat16
    bf16_bytes = base_bytes(model)
    if library == "peft":
        model = peft.get_peft_model(peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False),
                                    peft.LoraConfig(target_modules=TARGETS))
    else:
        model = loracast.get_peft_model(loracast.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False),
                                        loracast.LoraConfig(target_modules=TARGETS))
    finding = the(doctor(model), "upcast-frozen-params")
    norm_bytes = sum(p.numel() * 2 for n, p in model.named_parameters() if "norm" in n)
    extra = base_bytes(model) - bf16_bytes - norm_bytes
    assert f"{extra / 1024:.0f} KiB more than in bfloat16" in finding.title
    assert "model.embed_tokens.weight" in finding.seen and "lm_head.weight" in finding.seen
    apply_fix(finding, model=model)
    assert base_bytes(model) == bf16_bytes
    assert "upcast-frozen-params" not in doctor(model).ids and "mixed-frozen-dtypes" not in doctor(model).ids
    forward(model)  # no autocast needed: one dtype throughout


def trl_style_qlora(library: str):
    """A 4-bit bf16 Llama whose norms alone were upcast to fp32 (what TRL's QLoRA preparation did
    before trl PR #4457, and loracast's prepare_model_for_kbit_training(upcast="norms")), with LoRA."""
    import peft

    model = load_llama(4, "bf16")
    if library == "peft":
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                module.to(torch.float32)
        return peft.get_peft_model(model, peft.LoraConfig(target_modules=TARGETS))
    model = loracast.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False, upcast="norms")
    return loracast.get_peft_model(model, loracast.LoraConfig(target_modules=TARGETS))


@pytest.mark.parametrize("library", ["peft", "loracast"])
def test_frozen_base_in_several_dtypes_fails_outside_autocast_until_fixed(library):
    """fp32 norms beside a bf16 lm_head: generate() outside autocast fails with "expected m1 and m2 to
    have the same dtype" (huggingface/peft#1515, QLoRA bf16 + generate in a TrainerCallback;
    haotian-liu/LLaVA#785 "expected scalar type Float but found BFloat16"). Both printed ways must
    make the forward run: autocast, and one dtype for the frozen base."""
    model = trl_style_qlora(library)
    with pytest.raises(RuntimeError, match="same dtype|expected scalar type"):
        forward(model)
    finding = the(doctor(model), "mixed-frozen-dtypes")
    assert any(s.startswith("float32: model.norm.weight") for s in finding.seen)
    inner = model.get_base_model()  # modules transformers keeps in fp32 on purpose are not a fault
    inner._keep_in_fp32_modules = ["input_layernorm", "post_attention_layernorm", "norm"]
    assert "mixed-frozen-dtypes" not in doctor(model).ids
    inner._keep_in_fp32_modules = None
    assert any(s.startswith("bfloat16: lm_head.weight") for s in finding.seen)
    namespace = apply_fix(finding, 0, model=model, inputs={"input_ids": IDS, "max_new_tokens": 2, "do_sample": False})
    assert namespace["output"].shape == (2, IDS.shape[1] + 2)
    apply_fix(finding, 1, model=model)
    assert torch.isfinite(forward(model)).all() and "mixed-frozen-dtypes" not in doctor(model).ids


def test_8bit_base_ignores_autocast_off_in_peft_and_the_fix_casts_the_adapters():
    """PEFT with autocast_adapter_dtype=False on an 8-bit base keeps fp32 adapters (huggingface/peft#2889;
    PEFT's own test test_lora_8bit_bnb_dtype_no_autocast is a strict xfail). A PEFT model does not
    record the flag, so the doctor says it as info. Oracle: the adapter dtype asked for, and the
    adapted model's output against the same adapters in fp32 (bf16 tolerance)."""
    import peft

    model = peft.get_peft_model(load_llama(8, "bf16"), peft.LoraConfig(target_modules=TARGETS), autocast_adapter_dtype=False)
    randomize_b(model)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    before = forward(model)
    finding = the(doctor(model), "quant-no-compute-dtype")
    assert finding.severity == "info" and "autocast_adapter_dtype=False, PEFT ignored it" in finding.why
    apply_fix(finding, 1, model=model)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    torch.testing.assert_close(forward(model), before, rtol=0.05, atol=0.05)
    assert "quant-no-compute-dtype" not in doctor(model).ids


def test_8bit_layers_of_a_model_without_a_declared_dtype_in_loracast():
    """loracast's rule takes the model's declared dtype on an 8-bit base; a model built by hand declares
    none, so autocast off gives fp32: a warning (the plan records the flag), fixed by adapter_dtype=."""
    def base():
        return TwoLayer(linear8bit(float_linear(64, 64)), linear8bit(float_linear(64, 64, seed=1)))

    config = loracast.LoraConfig(target_modules=["first", "second"])
    model = loracast.get_peft_model(base(), config, autocast_adapter_dtype=False)
    finding = the(doctor(model), "quant-no-compute-dtype")
    assert finding.severity == "warning" and len(finding.seen) == 2
    fixed = apply_fix(finding, 0, base_model=base(), config=config)["model"]
    assert {p.dtype for n, p in fixed.named_parameters() if "lora_" in n} == {torch.bfloat16}
    assert fixed(torch.randn(3, 64)).shape == (3, 64) and "quant-no-compute-dtype" not in doctor(fixed).ids


def test_a_merge_into_a_4bit_base_is_recorded_and_the_fix_restores_the_trained_outputs(tmp_path):
    """merge_and_unload into a 4-bit base requantizes: outputs drift and, after the warning, nothing
    says so (huggingface/peft#2032: merging into the quantized model gave wrong results;
    axolotl-ai-cloud/axolotl#460: "reload the model with full weights before merging"). loracast now
    records the rounding on each merged layer; a PEFT merge leaves no record the doctor could read.
    Oracle: the unmerged model's logits; the fix (keep it unmerged) reproduces them exactly."""
    model = loracast.get_peft_model(load_llama(4, "bf16"), loracast.LoraConfig(target_modules=TARGETS))
    model.train()  # keeps bitsandbytes from repacking the 4-bit weights for its CPU kernel during the forward
    randomize_b(model)
    model.save_pretrained(tmp_path)
    unmerged = forward(model)
    merged = model.merge_and_unload()
    assert (forward(merged) - unmerged).abs().max() > 1e-3  # the drift
    report = doctor(merged)
    finding = the(report, "requantized-merge")
    assert len(finding.seen) == 4 and "max |error|" in finding.seen[0] and "no-adapters" not in report.ids
    quantized_base = load_llama(4, "bf16").train()
    fixed = apply_fix(finding, 0, quantized_base=quantized_base, adapter_path=str(tmp_path))["model"]
    torch.testing.assert_close(forward(fixed), unmerged, rtol=0, atol=0)
    assert doctor(fixed).findings == []
    merged_float = apply_fix(finding, 1, name=_saved_llama(False), adapter_path=str(tmp_path))["merged"]
    assert "requantized-merge" not in doctor(merged_float).ids


@pytest.mark.parametrize("library", ["peft", "loracast"])
def test_an_overflowing_fp16_merge_is_named_and_the_fix_merges_safely(library, make_llama, tmp_path):
    """A float16 merge of a large delta writes inf into the base weights and the model then outputs
    nan, although the unmerged adapter may work: huggingface/peft#1001 (safe_merge added: "two weight
    parameters could be overflowing when added"). Oracle: torch.isfinite on the fixed model's outputs."""
    import peft

    if library == "peft":
        model = peft.get_peft_model(make_llama(torch.float16), peft.LoraConfig(target_modules=TARGETS),
                                    autocast_adapter_dtype=False)
    else:
        model = loracast.get_peft_model(make_llama(torch.float16), loracast.LoraConfig(target_modules=TARGETS),
                                        precision="fast")
    randomize_b(model, scale=4e3, a_scale=30.0)  # each finite in float16, their product is not
    model.save_pretrained(str(tmp_path))
    model.merge_adapter()
    assert not torch.isfinite(forward(model)).all()
    finding = the(doctor(model), "non-finite-base")
    assert finding.severity == "error" and "self_attn.q_proj.base_layer.weight" in finding.seen[0]
    make_llama().save_pretrained(tmp_path / "base")
    namespace = apply_fix(finding, name=str(tmp_path / "base"), adapter_path=str(tmp_path))
    assert torch.isfinite(forward(namespace["model"])).all() and "non-finite-base" not in doctor(namespace["model"]).ids


def test_the_declared_dtype_is_read_without_the_deprecated_torch_dtype():
    """transformers 5 logs "`torch_dtype` is deprecated!" when `config.torch_dtype` is read; loracast
    read it whenever `config.dtype` was unset. Oracle: a config whose torch_dtype counts its reads."""
    from transformers import LlamaConfig

    from loracast.precision.rules import declared_dtype
    from tests.support.models import tiny_llama_config

    class Watched(LlamaConfig):
        reads = 0

        @property
        def torch_dtype(self):
            Watched.reads += 1
            return torch.bfloat16

    model = torch.nn.Module()
    model.config = Watched(**tiny_llama_config().to_diff_dict())
    model.config.dtype = None
    assert declared_dtype(model) is None and Watched.reads == 0
    model.config.dtype = "bfloat16"
    assert declared_dtype(model) == torch.bfloat16 and Watched.reads == 0

    class Old:  # transformers before 4.56 had only torch_dtype
        torch_dtype = "torch.float16"

    model.config = Old()
    assert declared_dtype(model) == torch.float16
