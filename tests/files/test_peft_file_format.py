"""PEFT's file format both ways, atomic saves, and clear errors for files that do not fit.

Oracle: PEFT 0.21 writes and reads the same folders; outputs must agree (fp32 atol 1e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from loracast import AdapterLoadError, ConfigError, LoraConfig, PeftModel, get_peft_model
from tests.support.models import mixed_net, randomize_adapters

TARGETS = ["lin", "emb", "gpt_conv", "conv1d", "conv2d"]
IDS = torch.randint(0, 32, (3, 8), generator=torch.Generator().manual_seed(0))
ROOT = Path(__file__).resolve().parents[2]


def trained_ours(**config):
    config.setdefault("target_modules", TARGETS)
    model = get_peft_model(mixed_net(), LoraConfig(r=4, **config)).eval()
    randomize_adapters(model)
    return model


def test_peft_loads_what_loracast_saves_with_equal_outputs(tmp_path):
    ours = trained_ours(modules_to_save=["head"])
    ours.add_adapter("second", LoraConfig(r=2, target_modules=["lin"]))
    randomize_adapters(ours, seed=9)
    with torch.no_grad():
        ours.base_model.model.head.modules_to_save["default"].weight.mul_(2)
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "second"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.lin.lora_A.weight" in keys
    assert "base_model.model.emb.lora_embedding_A" in keys
    assert "base_model.model.head.weight" in keys

    theirs = peft.PeftModel.from_pretrained(mixed_net(), tmp_path).eval()
    theirs.load_adapter(tmp_path / "second", "second")
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS), ours(IDS), atol=1e-5, rtol=0)
        ours.set_adapter("second")
        theirs.set_adapter("second")
        torch.testing.assert_close(theirs(IDS), ours(IDS), atol=1e-5, rtol=0)


def test_loracast_loads_what_peft_saves_with_equal_outputs(tmp_path):
    theirs = peft.get_peft_model(mixed_net(), peft.LoraConfig(r=4, target_modules=TARGETS, modules_to_save=["head"]))
    theirs.add_adapter("second", peft.LoraConfig(r=2, target_modules=["conv2d"]))
    randomize_adapters(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(mixed_net(), tmp_path).eval()
    ours.load_adapter(tmp_path / "second", "second")
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs(IDS), atol=1e-5, rtol=0)
        ours.set_adapter("second")
        theirs.set_adapter("second")
        torch.testing.assert_close(ours(IDS), theirs(IDS), atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in ours.parameters())  # is_trainable=False, as PEFT


def test_is_trainable_loads_a_trainable_adapter(tmp_path):
    trained_ours().save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(mixed_net(), tmp_path, is_trainable=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if "lora_" in n}


def test_selected_adapters_and_save_dtype(tmp_path):
    ours = get_peft_model(mixed_net(), LoraConfig(r=32, target_modules=TARGETS))
    ours.add_adapter("extra", LoraConfig(r=4, target_modules=["lin"]))
    ours.save_pretrained(tmp_path / "full", selected_adapters=["default"])
    ours.save_pretrained(tmp_path / "half", selected_adapters=["default"], save_dtype=torch.bfloat16)
    assert os.listdir(tmp_path / "full") == os.listdir(tmp_path / "half")  # no "extra" folder
    full = (tmp_path / "full" / "adapter_model.safetensors").stat().st_size
    half = (tmp_path / "half" / "adapter_model.safetensors").stat().st_size
    assert half < 0.6 * full
    assert {t.dtype for t in load_file(tmp_path / "half" / "adapter_model.safetensors").values()} == {torch.bfloat16}
    # loading a bf16 file still yields the precision rule's dtype (fp32 on an fp32 base)
    reloaded = PeftModel.from_pretrained(mixed_net(), tmp_path / "half")
    assert {p.dtype for n, p in reloaded.named_parameters() if "lora_" in n} == {torch.float32}
    with pytest.raises(ValueError, match=r"selected_adapters \['nope'\] not found"):
        ours.save_pretrained(tmp_path / "x", selected_adapters=["nope"])


def test_failed_save_leaves_the_earlier_adapter_intact(tmp_path):
    """A real I/O failure: the file-size limit (RLIMIT_FSIZE) makes the write fail part-way."""
    folder = tmp_path / "adapter"
    script = textwrap.dedent(f"""
        import resource, signal, sys, torch
        sys.path[:0] = [{str(ROOT / 'src')!r}, {str(ROOT)!r}]
        from loracast import LoraConfig, get_peft_model
        from tests.support.models import mixed_net, randomize_adapters
        model = get_peft_model(mixed_net(), LoraConfig(r=4, target_modules=["lin"]))
        randomize_adapters(model)
        model.save_pretrained({str(folder)!r})
        big = get_peft_model(mixed_net(), LoraConfig(r=64, target_modules={TARGETS!r}))
        randomize_adapters(big, seed=2)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            big.save_pretrained({str(folder)!r})
        except OSError as exc:
            print("failed as expected:", exc)
            sys.exit(0)
        sys.exit("the save did not fail")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "failed as expected" in result.stdout
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] == ["lin"]
    reloaded = PeftModel.from_pretrained(mixed_net(), folder)
    assert reloaded.base_model.model.lin.r["default"] == 4


def test_pickle_adapter_is_refused_unless_opted_in(tmp_path):
    ours = trained_ours(target_modules=["lin"])
    ours.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="pickle file, which can run code.*allow_pickle=True"):
        PeftModel.from_pretrained(mixed_net(), tmp_path)
    model = PeftModel.from_pretrained(mixed_net(), tmp_path, allow_pickle=True)
    torch.testing.assert_close(model.base_model.model.lin.lora_A["default"].weight,
                               tensors["base_model.model.lin.lora_A.weight"])


def test_pickle_with_code_is_not_executed_even_when_opted_in(tmp_path):
    trained_ours(target_modules=["lin"]).save_pretrained(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, tmp_path / "adapter_model.bin", _use_new_zipfile_serialization=True)
    with pytest.raises(AdapterLoadError, match="weights_only=True"):
        PeftModel.from_pretrained(mixed_net(), tmp_path, allow_pickle=True)
    assert not marker.exists()


def corrupt(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    trained_ours(target_modules=["lin"]).save_pretrained(tmp_path)
    corrupt(tmp_path, lambda t: t.__setitem__("base_model.model.lin.lora_A.weight", torch.zeros(5, 16)))
    with pytest.raises(AdapterLoadError, match=r"'base_model.model.lin.lora_A.weight' has shape \(5, 16\) "
                                               r"but the model expects \(4, 16\)"):
        PeftModel.from_pretrained(mixed_net(), tmp_path)


def test_missing_weights_for_targeted_modules_are_named(tmp_path):
    trained_ours(target_modules=["lin", "conv2d"]).save_pretrained(tmp_path)
    corrupt(tmp_path, lambda t: [t.pop(k) for k in list(t) if ".conv2d." in k])
    with pytest.raises(AdapterLoadError, match=r"lacks weights for modules the config targets: "
                                               r"base_model.model.conv2d.lora_A.weight"):
        PeftModel.from_pretrained(mixed_net(), tmp_path)


def test_empty_file_is_an_error(tmp_path):
    trained_ours(target_modules=["lin"]).save_pretrained(tmp_path)
    save_file({}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="holds no tensors"):
        PeftModel.from_pretrained(mixed_net(), tmp_path)


def test_non_float_tensor_is_an_error(tmp_path):
    trained_ours(target_modules=["lin"]).save_pretrained(tmp_path)
    corrupt(tmp_path, lambda t: t.__setitem__("base_model.model.lin.lora_B.weight", torch.zeros(16, 4, dtype=torch.int8)))
    with pytest.raises(AdapterLoadError, match="'base_model.model.lin.lora_B.weight' has dtype torch.int8"):
        PeftModel.from_pretrained(mixed_net(), tmp_path)


def test_unexpected_keys_warn_and_list_them(tmp_path):
    trained_ours(target_modules=["lin"]).save_pretrained(tmp_path)
    corrupt(tmp_path, lambda t: t.__setitem__("base_model.model.nothing.lora_A.weight", torch.zeros(2)))
    with pytest.warns(UserWarning, match="base_model.model.nothing.lora_A.weight"):
        PeftModel.from_pretrained(mixed_net(), tmp_path)


@pytest.mark.parametrize("text, field", [
    ("{not json", "<json>"),
    ('{"peft_type": "LORA", "r": "eight", "target_modules": ["lin"]}', "r"),
    ('{"peft_type": "IA3", "target_modules": ["lin"]}', "peft_type"),
    ('{"peft_type": "LORA", "target_modules": 5}', "target_modules"),
    ('[1, 2]', "<root>"),
])
def test_malformed_config_names_the_field(tmp_path, text, field):
    trained_ours(target_modules=["lin"]).save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ConfigError) as info:
        PeftModel.from_pretrained(mixed_net(), tmp_path)
    assert info.value.field == field
    assert repr(field) in str(info.value)


def test_missing_folder_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; loracast loads adapters from local folders"):
        PeftModel.from_pretrained(mixed_net(), tmp_path / "nope")


@pytest.mark.parametrize("name", ["a/b", "..", "has.dot", "", "__base__", "-x"])
def test_unsafe_adapter_names_are_refused(name):
    model = trained_ours(target_modules=["lin"])
    with pytest.raises(ValueError, match="is not allowed"):
        model.add_adapter(name, LoraConfig(target_modules=["lin"]))


def test_pickle_format_cannot_be_written():
    with pytest.raises(ValueError, match="writes only safetensors"):
        trained_ours(target_modules=["lin"]).save_pretrained("unused", safe_serialization=False)
