"""The doctor's quantization findings, policies and fingerprint on real bitsandbytes 4-bit layers
(tiny Llama loaded by transformers with BitsAndBytesConfig, on the CPU).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from loracast import LoraConfig, PeftModel, PrecisionError, PrecisionWarning, get_peft_model
from loracast.diagnostics import doctor
from tests.support.bnb_models import load_llama
from tests.support.fsdp_step import fsdp1_step

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def config() -> LoraConfig:
    return LoraConfig(target_modules=["q_proj", "v_proj"])


def ids(report) -> list[str]:
    return [f.id for f in report.findings]


def test_a_clean_qlora_model_reports_its_quantized_layers(tmp_path):
    model = get_peft_model(load_llama(4, "bf16", "uint8", "bf16"), config())
    report = doctor(model)
    assert report.findings == []
    row = report.rows[0]
    assert (row["base"], row["compute"], row["quantization"]) == ("uint8", "bfloat16", "bitsandbytes-4bit")
    assert row["dtypes"] == {"A": "float32", "B": "float32"}
    model.save_pretrained(tmp_path)
    assert doctor(tmp_path).findings == []


def test_storage_dtype_survives_the_cpu_repacking_of_an_eval_forward(tmp_path):
    model = get_peft_model(load_llama(4, "bf16", "bf16", "bf16"), config()).eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (1, 6)))  # may repack the 4-bit weights to uint8 in place
    assert doctor(model).rows[0]["base"] == "bfloat16"
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)  # no false "storage changed" difference
        PeftModel.from_pretrained(load_llama(4, "bf16", "bf16", "bf16"), tmp_path)


def test_adapter_dtype_other_than_the_compute_dtype():
    model = get_peft_model(load_llama(4, "bf16", "bf16", "fp16"), config(), adapter_dtype=torch.bfloat16,
                           autocast_adapter_dtype=False)
    finding = next(f for f in doctor(model).findings if f.id == "quant-compute-mismatch")
    assert "model.layers.0.self_attn.q_proj [default]: adapter bfloat16, compute float16" in finding.seen
    fast = get_peft_model(load_llama(4, "bf16", "bf16", "fp16"), config(), precision="fast")
    assert "quant-compute-mismatch" not in ids(doctor(fast))


def test_fsdp_findings_and_policy_on_4bit_storage(monkeypatch):
    packed = get_peft_model(load_llama(4, "bf16", "uint8", "bf16"), config())
    assert "fsdp-integer-storage" in ids(doctor(packed, fsdp=True))
    with pytest.raises(PrecisionError, match="cannot flatten integer tensors"):
        get_peft_model(load_llama(4, "bf16", "uint8", "bf16"), config(), precision="fsdp")
    wide = get_peft_model(load_llama(4, "bf16", "fp32", "bf16"), config(), precision="fast")
    assert "fsdp-storage-dtype" in ids(doctor(wide, fsdp=True))
    uniform = get_peft_model(load_llama(4, "bf16", "bf16", "bf16"), config(), precision="fsdp")
    assert {p.dtype for p in uniform.parameters()} == {torch.bfloat16}
    # one dtype; a unit that mixes trainable and frozen tensors still needs use_orig_params=True
    assert ids(doctor(uniform, fsdp=True)) == ["fsdp1-flatten"]
    monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", "true")
    assert doctor(uniform, fsdp=True).findings == []


def test_fingerprint_records_and_compares_the_bitsandbytes_config(tmp_path):
    get_peft_model(load_llama(4, "bf16", "uint8", "bf16", quant_type="nf4"), config()).save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(load_llama(4, "bf16", "uint8", "bf16", quant_type="fp4"), tmp_path)
    said = [str(w.message) for w in caught if issubclass(w.category, PrecisionWarning)]
    assert len(said) == 1 and "bnb_4bit_quant_type='nf4'" in said[0] and "bnb_4bit_quant_type='fp4'" in said[0]
    with pytest.raises(PrecisionError, match="compute bfloat16 at save, .* compute float32 now"):
        PeftModel.from_pretrained(load_llama(4, "bf16", "uint8", "fp32"), tmp_path, strict_precision=True)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_only_the_fsdp_policy_on_float_storage_wraps_with_fsdp1():
    for storage in ("uint8", "bf16"):  # integer packed weights, or float32 adapters on a bf16 carrier
        model = get_peft_model(load_llama(4, "bf16", storage, "bf16"), config()).train()
        assert {"fsdp-integer-storage", "fsdp-mixed-dtypes"} & set(ids(doctor(model, fsdp=True)))
        with pytest.raises(ValueError, match="Must flatten tensors with uniform dtype"):
            fsdp1_step(model)
    model = get_peft_model(load_llama(4, "bf16", "bf16", "bf16"), config(), precision="fsdp").train()
    fsdp1_step(model)
