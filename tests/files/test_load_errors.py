"""Malformed adapter folders get loracast's own errors, naming the file, the field and the fix.

Each case is one the issue measured raising a foreign exception (re.error, OverflowError,
TypeError, AttributeError, a torch RuntimeError, UnicodeDecodeError) or being wrongly accepted
(NaN/inf alpha, NaN tensors, unused fields of any type). A damaged fingerprint is warned about
and ignored (PEFT loads such files too), and refused clearly by precision="match-training".
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loracast import AdapterLoadError, ConfigError, LoraConfig, PeftModel, PrecisionError, PrecisionWarning
from loracast.errors import LoracastError
from tests.support.fault_injection import DAMAGED_FINGERPRINTS, MALFORMED_CONFIGS, shared_pair

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture(scope="module")
def pair():
    return shared_pair("loracast")


@pytest.fixture
def saved(pair, tmp_path):
    pair.new.save_pretrained(tmp_path)
    return tmp_path


def load(pair, folder, **kwargs):
    return PeftModel.from_pretrained(copy.deepcopy(pair.base), folder, **kwargs)


def rewrite_config(folder, **changes):
    path = folder / CONFIG
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))  # NaN/Infinity written as JSON's non-standard literals, as Python reads them


def rewrite_weights(folder, tensors=None, **metadata_changes):
    path = str(folder / WEIGHTS)
    with safe_open(path, framework="pt") as handle:
        metadata = dict(handle.metadata())
    metadata.update(metadata_changes)
    save_file(tensors if tensors is not None else load_file(path), path, metadata=metadata)


@pytest.mark.parametrize(("changes", "field"), MALFORMED_CONFIGS)
def test_malformed_config_is_a_config_error_naming_file_and_field(pair, saved, changes, field):
    rewrite_config(saved, **changes)
    with pytest.raises(ConfigError) as caught:
        load(pair, saved)
    assert caught.value.field == field
    assert str(saved / CONFIG) in str(caught.value) and "expected" in str(caught.value)


def test_config_that_is_not_utf8_names_the_file(pair, saved):
    (saved / CONFIG).write_bytes(b'{"r": 4, "target_modules": "\xff\xfe"}')
    with pytest.raises(ConfigError, match="UTF-8") as caught:
        load(pair, saved)
    assert str(saved / CONFIG) in str(caught.value)


@pytest.mark.parametrize("text", ["1" * 5000, "[" * 100_000 + "]" * 100_000])
def test_json_no_parser_can_read_is_a_config_error(pair, saved, text):
    (saved / CONFIG).write_text(text)
    with pytest.raises(ConfigError):
        load(pair, saved)


@pytest.mark.parametrize("entry", sorted(DAMAGED_FINGERPRINTS))
def test_damaged_fingerprint_is_warned_about_and_ignored(pair, saved, entry):
    with safe_open(str(saved / WEIGHTS), framework="pt") as handle:
        fingerprint = json.loads(handle.metadata()["loracast.fingerprint"])
    fingerprint[entry] = DAMAGED_FINGERPRINTS[entry]
    rewrite_weights(saved, **{"loracast.fingerprint": json.dumps(fingerprint)})
    with pytest.warns(PrecisionWarning, match=f"damaged: entry '{entry}'"):
        model = load(pair, saved).eval()
    with torch.no_grad():  # oracle: the adapter's own outputs before saving (fp32, atol 1e-6)
        torch.testing.assert_close(model(pair.ids).logits, pair.outputs["new"], atol=1e-6, rtol=0)
    with pytest.raises(PrecisionError, match="match-training.*damaged"):
        load(pair, saved, precision="match-training")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_adapter_tensor_is_refused_by_name_unless_allowed(pair, saved, bad):
    tensors = load_file(str(saved / WEIGHTS))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = bad
    rewrite_weights(saved, tensors)
    with pytest.raises(AdapterLoadError, match="NaN or infinite") as caught:
        load(pair, saved)
    assert key in str(caught.value) and "allow_nonfinite=True" in str(caught.value)
    with pytest.warns(UserWarning, match="allow_nonfinite=True"):
        model = load(pair, saved, allow_nonfinite=True)
    loaded = dict(model.named_parameters())[key.replace("lora_B.weight", "lora_B.default.weight")]
    assert not math.isfinite(float(loaded[0, 0]))


def test_value_that_overflows_the_model_dtype_is_refused(pair, saved):
    tensors = load_file(str(saved / WEIGHTS))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = 1e38  # finite in float32, inf once rounded into a float16 adapter
    rewrite_weights(saved, tensors)
    with pytest.raises(AdapterLoadError, match="once rounded"):
        load(pair, saved, adapter_dtype=torch.float16)


def test_refused_file_changes_nothing_in_the_model(pair, saved):
    # base tensors a file carries (trained biases, PEFT's saved embeddings) are copied into the
    # base model itself: a file refused for a NaN elsewhere must not have changed them first
    base = copy.deepcopy(pair.base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    tensors = load_file(str(saved / WEIGHTS))
    tensors["base_model.model.model.norm.weight"] = torch.full_like(base.model.norm.weight, 7.0)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] = float("nan")
    rewrite_weights(saved, tensors)
    with pytest.raises(AdapterLoadError):
        PeftModel.from_pretrained(base, saved)
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_every_error_above_is_a_loracast_error():
    # the CLI and users catch one family; the classes used above are all in it
    assert all(issubclass(cls, LoracastError) for cls in (AdapterLoadError, ConfigError, PrecisionError))


def test_config_constructed_in_code_refuses_nonfinite_and_wrongly_typed_values():
    for kwargs in (dict(lora_alpha=float("nan")), dict(alpha_pattern={"q": float("inf")}),
                   dict(qalora_group_size=16.0), dict(auto_mapping=[1]), dict(use_qalora=0)):
        with pytest.raises(ConfigError), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            LoraConfig(**kwargs)
