"""The doctor's quantization findings and the fingerprint on torchao layers (the tiny Llama quantized
by loracast's `quantize_base`, or loaded through transformers' TorchAoConfig), as
`test_doctor_bnb.py` does for bitsandbytes.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("torchao")

from loracast import (
    LoraConfig,
    PeftModel,
    PrecisionError,
    PrecisionWarning,
    RequantizationWarning,
    get_peft_model,
)
from loracast.diagnostics import doctor
from tests.support.models import read_fingerprint
from tests.support.torchao_models import KINDS, load_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BACKEND = {"int8": "torchao-int8", "int4": "torchao-intx"}


def config() -> LoraConfig:
    return LoraConfig(target_modules=["q_proj", "v_proj"])


def ids(report) -> list[str]:
    return [f.id for f in report.findings]


@pytest.mark.parametrize("kind", KINDS)
def test_a_clean_model_names_its_backend_dtypes_and_config(kind, tmp_path):
    model = get_peft_model(load_llama(kind, "bf16"), config())
    report = doctor(model)  # used to die inside torchao (aten.abs on the packed weight)
    assert report.findings == []
    row = report.rows[0]
    assert (row["base"], row["compute"], row["quantization"]) == ("int8", "bfloat16", BACKEND[kind])
    [entry] = report.quantization
    assert (entry["backend"], entry["layers"], entry["storage"], entry["compute"], entry["config_source"]) == \
        (BACKEND[kind], 4, "int8", "bfloat16", "supplied")
    grid = "granularity=PerRow" if kind == "int8" else "weight_dtype=int4, granularity=PerGroup(group_size=32)"
    assert grid in entry["requantize_config"]
    text = report.render(rich=False)
    assert f"{BACKEND[kind]}: 4 adapted layers, storage int8, compute bf16; merges requantize with" in text
    model.save_pretrained(tmp_path)
    assert doctor(tmp_path).findings == []


def test_transformers_loaded_models_report_an_inferred_config():
    report = doctor(get_peft_model(load_llama("int8", "bf16", how="transformers"), config()))
    assert report.findings == []
    assert report.quantization[0]["config_source"] == "inferred"
    assert "(inferred from the weight)" in report.render(rich=False)


@pytest.mark.parametrize("kind", KINDS)
def test_requantized_merges_are_reported_and_outlive_merge_and_unload(kind):
    model = get_peft_model(load_llama(kind, "fp32"), config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        model.merge_adapter()
    finding = next(f for f in doctor(model).findings if f.id == "requantized-merge")
    assert len(finding.seen) == 4
    assert any(s.startswith("model.layers.0.self_attn.q_proj.base_layer: max |error| ") and
               "against an rms adapter delta of 0.0" in s for s in finding.seen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        plain = model.merge_and_unload()
    assert "requantized-merge" in ids(doctor(plain))
    model = get_peft_model(load_llama(kind, "fp32"), config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        model.merge_adapter()
    model.unmerge_adapter()
    assert "requantized-merge" not in ids(doctor(model))


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_dtype_other_than_the_compute_dtype(kind):
    model = get_peft_model(load_llama(kind, "bf16"), config(), adapter_dtype=torch.float16,
                           autocast_adapter_dtype=False)
    finding = next(f for f in doctor(model).findings if f.id == "quant-compute-mismatch")
    assert "model.layers.0.self_attn.q_proj [default]: adapter float16, compute bfloat16" in finding.seen
    assert "quantize_base(base_model.to(torch.bfloat16)" in finding.fix
    fast = get_peft_model(load_llama(kind, "bf16"), config(), precision="fast")
    assert {p.dtype for n, p in fast.named_parameters() if "lora_" in n} == {torch.bfloat16}
    assert "quant-compute-mismatch" not in ids(doctor(fast))


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp_findings_and_policy_on_integer_storage(kind):
    model = get_peft_model(load_llama(kind, "bf16"), config())
    assert "fsdp-integer-storage" in ids(doctor(model, fsdp=True))
    with pytest.raises(PrecisionError, match="cannot flatten integer tensors"):
        get_peft_model(load_llama(kind, "bf16"), config(), precision="fsdp")


def test_fingerprint_records_backend_config_and_merges_and_compares_them(tmp_path):
    model = get_peft_model(load_llama("int8", "bf16"), config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        model.merge_adapter()
    model.save_pretrained(tmp_path)
    quantization = read_fingerprint(tmp_path)["quantization"]
    assert quantization["backends"] == ["torchao-int8"] and quantization["storage"] == ["int8"]
    assert quantization["compute"] == ["bfloat16"] and quantization["requantized_merges"] == 4
    assert quantization["layer_configs"] == ["torchao-int8: Int8WeightOnlyConfig(granularity=PerRow(dim=-1))"]
    assert read_fingerprint(tmp_path)["environment"]["torchao"] is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)  # the merged state at save is no difference
        PeftModel.from_pretrained(load_llama("int8", "bf16"), tmp_path)
    with pytest.raises(PrecisionError, match="torchao-int8 storage int8 compute bfloat16 at save, "
                                             "torchao-intx storage int8 compute bfloat16 now"):
        PeftModel.from_pretrained(load_llama("int4", "bf16"), tmp_path, strict_precision=True)
