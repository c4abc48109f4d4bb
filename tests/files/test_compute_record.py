"""The fingerprint records how an adapter's layers actually computed (the compute mode belongs to a
layer, not to an adapter); tests/diagnostics/test_doctor.py has the doctor's report of layers that disagree."""

from __future__ import annotations

import torch

import loracast
from loracast import LoraConfig, PeftModel, get_peft_model
from tests.support.models import read_fingerprint

Q0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"


def _shared_with_mixed(make_llama):
    """'default' on q_proj and v_proj (stable: exact); 'm' on q_proj and k_proj with precision='mixed',
    which switches the q_proj layers they share to fast."""
    model = get_peft_model(make_llama(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("m", LoraConfig(r=4, target_modules=["q_proj", "k_proj"]), precision="mixed")
    return model


def test_set_lora_compute_after_get_peft_model_is_recorded(make_llama, tmp_path):
    model = get_peft_model(make_llama(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"]))
    loracast.set_lora_compute(model, "fast")  # trained fast from here on
    model.save_pretrained(tmp_path)
    assert read_fingerprint(tmp_path)["precision"]["lora_compute"] == "fast"


def test_adapter_sharing_layers_with_a_mixed_one_is_recorded_layer_by_layer(make_llama, tmp_path):
    model = _shared_with_mixed(make_llama)
    model.save_pretrained(tmp_path)
    default = read_fingerprint(tmp_path)["precision"]
    assert default["policy"] == "stable"
    assert default["lora_compute"] == "mixed" and default["fast_layers"] == [Q0, Q1]
    assert read_fingerprint(tmp_path / "m")["precision"]["lora_compute"] == "fast"
    # match-training restores the modes layer by layer
    loaded = PeftModel.from_pretrained(make_llama(torch.bfloat16), tmp_path, precision="match-training")
    modes = {path: layer.lora_compute for path, layer in loaded.base_model.lora_layers()}
    assert {path for path, mode in modes.items() if mode == "fast"} == {Q0, Q1}
    assert modes["model.layers.0.self_attn.v_proj"] == "exact"

