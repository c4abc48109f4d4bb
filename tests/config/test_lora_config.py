"""`LoraConfig` has PEFT's fields and defaults, round-trips PEFT's JSON, and refuses what it cannot do."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch

from loracast import ConfigError, LoraConfig

SHARED_FIELDS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "bias",
                 "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
                 "rank_pattern", "alpha_pattern", "inference_mode", "base_model_name_or_path", "task_type",
                 "lora_bias", "revision"]


def test_defaults_equal_peft():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for name in SHARED_FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name


def test_every_field_has_help():
    for f in dataclasses.fields(LoraConfig):
        assert f.metadata.get("help"), f.name


def test_json_written_by_loracast_is_read_by_peft_and_back(tmp_path):
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, bias="lora_only",
                        use_rslora=True, rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 8},
                        layers_to_transform=[0, 1], layers_pattern="layers", task_type="CAUSAL_LM",
                        modules_to_save=["lm_head"], init_lora_weights="gaussian")
    config.save_pretrained(tmp_path)
    theirs = peft.LoraConfig.from_pretrained(tmp_path)
    for name in SHARED_FIELDS:
        if name == "inference_mode":
            continue
        value = getattr(theirs, name)
        value = sorted(value) if isinstance(value, set) else value
        expected = getattr(config, name)
        assert value == (sorted(expected) if name == "target_modules" else expected), name
    theirs.save_pretrained(tmp_path / "peft")
    again = LoraConfig.from_pretrained(tmp_path / "peft")
    for name in SHARED_FIELDS:
        if name != "inference_mode":
            assert getattr(again, name) == getattr(config, name) or sorted(getattr(again, name)) == sorted(
                getattr(config, name)), name
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written) == set(json.loads((tmp_path / "peft" / "adapter_config.json").read_text()))
    assert written["inference_mode"] is True and written["peft_type"] == "LORA"


@pytest.mark.parametrize("field, value", [
    ("init_lora_weights", "eva"),
    ("init_lora_weights", "corda"),
    ("layer_replication", [[0, 1]]),
    ("alora_invocation_tokens", [5]),
    ("megatron_config", {"tensor_model_parallel_size": 2}),
    ("use_bdlora", {"target_modules_bd_a": ["q"]}),
    ("use_qalora", True),
])
def test_unimplemented_peft_options_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError) as info:
        LoraConfig(target_modules=["q"], **{field: value})
    assert info.value.field == field
    assert field in str(info.value)


@pytest.mark.parametrize("kwargs, field, hint", [
    (dict(r=0), "r", "positive integer"),
    (dict(r=2.5), "r", "integer"),
    (dict(lora_dropout=1.5), "lora_dropout", r"\[0, 1\)"),
    (dict(bias="some"), "bias", "one of"),
    (dict(task_type="CHAT"), "task_type", "one of"),
    (dict(target_modules=[1, 2]), "target_modules", "list of module names"),
    (dict(target_modules="q", layers_to_transform=[0]), "layers_to_transform", "regex"),
    (dict(target_modules=["q"], layers_pattern="layers"), "layers_to_transform", "together with layers_pattern"),
    (dict(rank_pattern={"q": 0}), "rank_pattern['q']", "positive integer rank"),
    (dict(fan_in_fan_out="yes"), "fan_in_fan_out", "true or false"),
])
def test_invalid_values_name_the_field_and_the_fix(kwargs, field, hint):
    with pytest.raises(ConfigError, match=hint) as info:
        LoraConfig(**kwargs)
    assert info.value.field == field


def test_unknown_fields_from_newer_peft_are_kept_with_a_warning(tmp_path):
    data = LoraConfig(target_modules=["q"]).to_dict() | {"shiny_new_option": {"a": 1}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"fields unknown to loracast.*\['shiny_new_option'\]"):
        config = LoraConfig.from_pretrained(tmp_path)
    assert config.extra_fields == {"shiny_new_option": {"a": 1}}
    config.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["shiny_new_option"] == {"a": 1}


def test_scaling_follows_rslora():
    from torch import nn

    from loracast.layers import Linear

    layer = Linear(nn.Linear(4, 4))
    for name, use_rslora in (("plain", False), ("rslora", True)):
        layer.update_layer(name, 16, 32, lora_dropout=0.0, init_lora_weights=True, use_rslora=use_rslora,
                           lora_bias=False, dtype=torch.float32, device=torch.device("cpu"))
    assert layer.scaling == {"plain": 2.0, "rslora": 8.0}  # alpha / r and alpha / sqrt(r)
