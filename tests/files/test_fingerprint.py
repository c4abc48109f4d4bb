"""The precision fingerprint: what save_pretrained records, PEFT compatibility, and the load-time comparison."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loracast import LoraConfig, PeftModel, PrecisionError, PrecisionWarning, get_peft_model
from loracast.files import fingerprint as fp
from loracast.files.format import WEIGHTS_NAME
from loracast.precision.view import adapter_tensors_of
from tests.support.fake_quant import fake_backend, quantize  # noqa: F401  (fixture)
from tests.support.models import read_fingerprint


def config(**extra) -> LoraConfig:
    return LoraConfig(target_modules=["q_proj", "v_proj"], **extra)


def randomize(peft_model, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in adapter_tensors_of(peft_model.base_model.model):
            t.tensor.copy_(torch.randn(t.tensor.shape, generator=generator) * 0.1)


def precision_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, PrecisionWarning)]


def load(base, folder, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, folder, **kwargs)
    return model, precision_warnings(caught)


def test_save_records_dtypes_quantization_policy_and_environment(make_llama, tmp_path, fake_backend):
    base = quantize(make_llama(torch.bfloat16), storage=torch.int8, compute=torch.bfloat16, names=("q_proj",))
    model = get_peft_model(base, config(modules_to_save=["lm_head"]), precision="fast")
    model.save_pretrained(tmp_path, save_dtype=torch.float16)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt"
    record = json.loads(metadata[fp.FINGERPRINT_KEY])
    a_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert record["adapter_dtypes"][a_key] == "bfloat16"  # the compute dtype of the quantized layer
    assert record["adapter_dtypes"]["base_model.model.lm_head.weight"] == "bfloat16"
    assert record["save_dtype"] == "float16"
    assert record["model_dtype"] == "bfloat16"
    assert record["base_layers"]["model.layers.0.self_attn.q_proj"] == "fake-int8:int8/bfloat16"
    assert record["base_layers"]["model.layers.0.self_attn.v_proj"] == "bfloat16"
    assert record["quantization"]["storage"] == ["int8"] and record["quantization"]["backends"] == ["fake-int8"]
    assert record["precision"] == {"policy": "fast", "autocast_adapter_dtype": False, "adapter_dtype": None,
                                   "explicit": True, "lora_compute": "exact"}
    env = record["environment"]
    assert env["torch"] == torch.__version__.split("+")[0] and env["device_type"] == "cpu"
    assert env["transformers"] and env["loracast"]
    assert record["trainable"] is True


def test_peft_loads_a_fingerprinted_adapter(make_llama, tmp_path):
    import peft

    ours = get_peft_model(make_llama(), config())
    randomize(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_llama(), str(tmp_path))
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=0)
    assert peft.utils.load_peft_weights(str(tmp_path)).keys() == load_file(tmp_path / WEIGHTS_NAME).keys()


def test_same_environment_loads_silently(make_llama, tmp_path):
    get_peft_model(make_llama(torch.bfloat16), config()).save_pretrained(tmp_path)
    model, said = load(make_llama(torch.bfloat16), tmp_path, strict_precision=True)
    assert said == []
    assert model._fingerprints["default"]["model_dtype"] == "bfloat16"


def test_a_changed_environment_warns_once_with_each_difference(make_llama, tmp_path, monkeypatch):
    real = fp.package_version
    monkeypatch.setattr(fp, "package_version", lambda name: "4.0.0" if name == "transformers" else real(name))
    get_peft_model(make_llama(torch.bfloat16), config()).save_pretrained(tmp_path)
    monkeypatch.setattr(fp, "package_version", real)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    _, said = load(make_llama(torch.float32), tmp_path)
    assert len(said) == 1
    assert "transformers version: 4.0.0 at save" in said[0]
    assert "torch version: " in said[0] and "9.9.9 now" in said[0]
    assert "base model dtype: bfloat16 at save, float32 now" in said[0]
    assert "strict_precision=True" in said[0]


def test_strict_precision_refuses_and_leaves_the_model_unchanged(make_llama, tmp_path, monkeypatch):
    get_peft_model(make_llama(), config()).save_pretrained(tmp_path / "a")
    monkeypatch.setattr(fp, "package_version", lambda name: "0.0.1")
    with pytest.raises(PrecisionError, match="transformers version: .* at save, 0.0.1 now"):
        PeftModel.from_pretrained(make_llama(), tmp_path / "a", strict_precision=True)
    model = get_peft_model(make_llama(), config())
    with pytest.raises(PrecisionError, match="drop strict_precision=True"):
        model.load_adapter(tmp_path / "a", "other", strict_precision=True)
    assert list(model.peft_config) == ["default"]
    assert all(t.adapter == "default" for t in adapter_tensors_of(model.base_model.model))


def test_peft_written_adapters_load_as_before(make_llama, tmp_path):
    import peft

    theirs = peft.get_peft_model(make_llama(), peft.LoraConfig(target_modules=["q_proj", "v_proj"]))
    theirs.save_pretrained(str(tmp_path))
    model, said = load(make_llama(), tmp_path, strict_precision=True)
    assert said == [] and model._fingerprints == {}
    with pytest.raises(PrecisionError, match="no loracast fingerprint"):
        PeftModel.from_pretrained(make_llama(), tmp_path, precision="match-training")


def test_match_training_restores_the_saved_dtypes(make_llama, tmp_path):
    trained = get_peft_model(make_llama(torch.bfloat16), config(), precision="fast")
    randomize(trained)
    layer = trained.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_A["default"].float()  # one tensor trained in float32, the rest in bfloat16
    trained.save_pretrained(tmp_path)

    default, said = load(make_llama(torch.bfloat16), tmp_path)
    assert {t.tensor.dtype for t in adapter_tensors_of(default.base_model.model)} == {torch.float32}
    assert len(said) == 1 and "adapter dtype of" in said[0] and "precision='match-training'" in said[0]

    matched, said = load(make_llama(torch.bfloat16), tmp_path, precision="match-training")
    assert said == []
    expected = {t.name: t.tensor for t in adapter_tensors_of(trained.base_model.model)}
    for t in adapter_tensors_of(matched.base_model.model):
        assert t.tensor.dtype == expected[t.name].dtype
        assert torch.equal(t.tensor, expected[t.name])


def test_an_explicit_dtype_choice_is_not_reported_as_a_difference(make_llama, tmp_path):
    get_peft_model(make_llama(torch.bfloat16), config(), precision="fast").save_pretrained(tmp_path)
    _, said = load(make_llama(torch.bfloat16), tmp_path, precision="stable", strict_precision=True)
    assert said == []


def test_a_damaged_fingerprint_warns_and_loads(make_llama, tmp_path):
    get_peft_model(make_llama(), config()).save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    save_file(load_file(path), path, metadata={"format": "pt", fp.FINGERPRINT_KEY: "{not json"})
    model, said = load(make_llama(), tmp_path)
    assert len(said) == 1 and "not valid JSON" in said[0]
    assert model._fingerprints == {}


def test_quantization_changes_are_reported(make_llama, tmp_path, fake_backend, monkeypatch):
    real = fp.package_version
    monkeypatch.setattr(fp, "package_version", lambda name: "0.40.0" if name == "bitsandbytes" else real(name))
    quantized = quantize(make_llama(torch.bfloat16), storage=torch.int8, compute=torch.bfloat16)
    get_peft_model(quantized, config()).save_pretrained(tmp_path)
    monkeypatch.setattr(fp, "package_version", real)
    _, said = load(quantize(make_llama(torch.bfloat16), storage=torch.int8, compute=torch.float32), tmp_path)
    assert len(said) == 1
    assert f"bitsandbytes version: 0.40.0 at save, {real('bitsandbytes')} now" in said[0]
    assert "quantization: fake-int8 storage int8 compute bfloat16 at save, fake-int8 storage int8 compute " \
           "float32 now" in said[0]
    assert "base layer dtype of model.layers.0.self_attn.q_proj and 3 more: fake-int8:int8/bfloat16 at save" \
           in said[0]


def test_bitsandbytes_version_is_compared_only_for_quantized_models(make_llama, tmp_path, monkeypatch):
    real = fp.package_version
    monkeypatch.setattr(fp, "package_version", lambda name: "0.40.0" if name == "bitsandbytes" else real(name))
    get_peft_model(make_llama(), config()).save_pretrained(tmp_path)
    monkeypatch.setattr(fp, "package_version", real)
    assert load(make_llama(), tmp_path)[1] == []


def test_device_type_change_is_reported(make_llama, tmp_path):
    get_peft_model(make_llama(), config()).save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as handle:
        record = json.loads(handle.metadata()[fp.FINGERPRINT_KEY])
    record["environment"]["device_type"] = "cuda"  # as written by a run on a GPU
    save_file(load_file(path), path, metadata={"format": "pt", **fp.fingerprint_metadata(record)})
    _, said = load(make_llama(), tmp_path)
    assert len(said) == 1 and "device type: cuda at save, cpu now" in said[0]


def test_dora_magnitude_dtype_is_recorded_and_a_changed_one_reported(make_llama, tmp_path):
    model = get_peft_model(make_llama(torch.bfloat16), config(use_dora=True), autocast_adapter_dtype=False)
    model.save_pretrained(tmp_path)
    record = read_fingerprint(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    assert record["magnitude_dtypes"] == ["bfloat16"] and record["adapter_dtypes"][key] == "bfloat16"
    loaded, messages = load(make_llama(torch.bfloat16), tmp_path)  # autocast on: fp32 magnitudes now
    assert loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight.dtype \
        == torch.float32
    others = len(record["adapter_dtypes"]) - 1  # every A, B and magnitude is reported
    assert len(messages) == 1 and f"and {others} more: bfloat16 at save, float32 now" in messages[0]
    again, messages = load(make_llama(torch.bfloat16), tmp_path, precision="match-training")
    assert not messages
    assert again.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight.dtype \
        == torch.bfloat16
    plain = get_peft_model(make_llama(), config())
    plain.save_pretrained(tmp_path / "plain")
    assert read_fingerprint(tmp_path / "plain")["magnitude_dtypes"] is None


def test_a_base_dequantized_from_gguf_is_recorded_as_not_quantized(make_llama, tmp_path):
    # transformers keeps GgufConfig on a model it read from a GGUF file, though every layer is a
    # plain float layer after loading: an adapter saved on it and loaded on the same weights from a
    # plain folder must not report a quantization difference
    from transformers.utils.quantization_config import GgufConfig

    base = make_llama(torch.bfloat16)
    base.config.quantization_config = GgufConfig(gguf_file="model.gguf")
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        PeftModel.from_pretrained(make_llama(torch.bfloat16), tmp_path)
