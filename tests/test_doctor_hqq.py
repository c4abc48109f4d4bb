"""The doctor's quantization findings and the fingerprint on HQQ layers (the tiny Llama quantized by
loracast's `hqq.quantize_base`), as `test_doctor_torchao.py` does for torchao.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("hqq")

from hqq_models import load_llama
from loracast import (
    LoraConfig,
    PeftModel,
    PrecisionError,
    PrecisionWarning,
    RequantizationWarning,
    get_peft_model,
)
from loracast.diagnostics import doctor
from models import read_fingerprint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def config() -> LoraConfig:
    return LoraConfig(target_modules=["q_proj", "v_proj"])


def ids(report) -> list[str]:
    return [f.id for f in report.findings]


def _merged(model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02, generator=torch.Generator().manual_seed(len(name)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        model.merge_adapter()


def test_a_clean_model_names_its_backend_dtypes_and_config(tmp_path):
    model = get_peft_model(load_llama(4, "bf16"), config())
    report = doctor(model)
    assert report.findings == []
    row = report.rows[0]
    assert (row["base"], row["compute"], row["quantization"]) == ("uint8", "bfloat16", "hqq")
    [entry] = report.quantization
    assert (entry["backend"], entry["layers"], entry["storage"], entry["compute"]) == ("hqq", 4, "uint8", "bfloat16")
    assert entry["requantize_config"] == "HQQ(nbits=4, group_size=32, axis=1)"
    assert "hqq: 4 adapted layers, storage uint8, compute bf16; merges requantize with HQQ(nbits=4" in \
        report.render(rich=False)
    model.save_pretrained(tmp_path)
    assert doctor(tmp_path).findings == []


def test_requantized_merges_are_reported_and_outlive_merge_and_unload():
    model = get_peft_model(load_llama(4, "fp32"), config())
    _merged(model)
    finding = next(f for f in doctor(model).findings if f.id == "requantized-merge")
    assert len(finding.seen) == 4
    assert any(s.startswith("model.layers.0.self_attn.q_proj.base_layer: max |error| ") for s in finding.seen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        plain = model.merge_and_unload()
    assert "requantized-merge" in ids(doctor(plain))
    model = get_peft_model(load_llama(4, "fp32"), config())
    _merged(model)
    model.unmerge_adapter()
    assert "requantized-merge" not in ids(doctor(model))


def test_adapter_dtype_other_than_the_compute_dtype_names_hqqs_fix():
    model = get_peft_model(load_llama(4, "bf16"), config(), adapter_dtype=torch.float16,
                           autocast_adapter_dtype=False)
    finding = next(f for f in doctor(model).findings if f.id == "quant-compute-mismatch")
    assert "model.layers.0.self_attn.q_proj [default]: adapter float16, compute bfloat16" in finding.seen
    assert "HQQLinear(linear, quant_config, compute_dtype=torch.bfloat16" in finding.fix
    fast = get_peft_model(load_llama(4, "bf16"), config(), precision="fast")
    assert {p.dtype for n, p in fast.named_parameters() if "lora_" in n} == {torch.bfloat16}
    assert "quant-compute-mismatch" not in ids(doctor(fast))


def test_fsdp_findings_and_policy_on_integer_storage():
    model = get_peft_model(load_llama(4, "bf16"), config())
    assert "fsdp-integer-storage" in ids(doctor(model, fsdp=True))
    with pytest.raises(PrecisionError, match="cannot flatten integer tensors"):
        get_peft_model(load_llama(4, "bf16"), config(), precision="fsdp")


def test_fingerprint_records_backend_dtypes_and_merges_and_compares_them(tmp_path):
    model = get_peft_model(load_llama(4, "bf16"), config())
    _merged(model)
    model.save_pretrained(tmp_path)
    quantization = read_fingerprint(tmp_path)["quantization"]
    assert quantization["backends"] == ["hqq"] and quantization["storage"] == ["uint8"]
    assert quantization["compute"] == ["bfloat16"] and quantization["requantized_merges"] == 4
    assert quantization["layer_configs"] == ["hqq: HQQ(nbits=4, group_size=32, axis=1)"]
    assert read_fingerprint(tmp_path)["environment"]["hqq"] is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)  # the same base: no difference
        PeftModel.from_pretrained(load_llama(4, "bf16"), tmp_path)
    with pytest.raises(PrecisionError, match="hqq storage uint8 compute bfloat16 at save, .*float32 now"):
        PeftModel.from_pretrained(load_llama(4, "fp32"), tmp_path, strict_precision=True)
