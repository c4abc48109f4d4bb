"""Property: any adapter folder loads, or raises a LoracastError; never another exception, and
never a wrong acceptance (a non-finite alpha, a field of the wrong type, a damaged fingerprint
that stops a load PEFT would do).

Hypothesis draws values for `adapter_config.json` fields (JSON of every kind, plus the values the
issue measured: invalid regexes, 10**400, 2**31, NaN) and mutations of a real safetensors header
(dtypes, shapes, offsets, the header length, fingerprint entries, the config digest).
Derandomized and bounded (examples and deadline) so the file runs in a few seconds in CI.
"""

from __future__ import annotations

import copy
import json
import math
import struct
import tempfile
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loracast import LoraConfig, PeftModel
from loracast.errors import LoracastError
from tests.support.fault_injection import shared_pair

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
FUZZ = settings(max_examples=40, deadline=timedelta(seconds=10), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

TRICKY_STRINGS = ["(", "[a", "q_proj(", "*", "a{99999999999}", "(?P<idx>x)", "q_proj", "v_proj", "all-linear",
                  ".*", "layers", "", "LORA", "CAUSAL_LM", "gaussian", "none", "\x00", "\udcff"]
TRICKY_NUMBERS = [0, -1, 1, 4, 2**31, 10**30, 10**400, 0.5, 1e308, float("nan"), float("inf"), float("-inf")]
scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(TRICKY_NUMBERS), st.integers(-10, 100),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(TRICKY_STRINGS),
                    st.text(max_size=6))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(TRICKY_STRINGS) | st.text(max_size=4), inner,
                                                 max_size=3)), max_leaves=6)
FIELDS = sorted(name for name in LoraConfig.__dataclass_fields__ if name != "extra_fields") + ["not_a_peft_field"]
# the fields the loader acts on, drawn half the time, with values shaped like theirs
CORE_FIELDS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save",
               "rank_pattern", "alpha_pattern", "layers_pattern", "layers_to_transform", "bias", "init_lora_weights",
               "use_rslora", "qalora_group_size", "auto_mapping"]
field_names = st.one_of(st.sampled_from(CORE_FIELDS), st.sampled_from(FIELDS))
field_values = st.one_of(
    st.sampled_from(TRICKY_STRINGS), st.sampled_from(TRICKY_NUMBERS), json_values,
    st.dictionaries(st.sampled_from(TRICKY_STRINGS), st.sampled_from(TRICKY_NUMBERS), max_size=2),
    st.lists(st.sampled_from(TRICKY_STRINGS), max_size=3))


@pytest.fixture(scope="module")
def pair():
    return shared_pair("loracast")


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory):
    """A saved adapter, and the same without the config digest (as PEFT writes it), so a fuzzed
    config is loaded rather than refused as coming from another save."""
    folder = tmp_path_factory.mktemp("reference")
    pair.new.save_pretrained(folder)
    weights = folder / WEIGHTS
    with safe_open(str(weights), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "loracast.config_sha256"}
    unbound = folder / "unbound.safetensors"
    save_file(load_file(str(weights)), str(unbound), metadata=metadata)
    return {"config": json.loads((folder / CONFIG).read_text()), "weights": weights.read_bytes(),
            "unbound": unbound.read_bytes()}


def outcome(pair, folder: Path) -> Exception | torch.nn.Module:
    """The loaded model, or the exception loading raised (any exception but a LoracastError fails)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return PeftModel.from_pretrained(copy.deepcopy(pair.base), folder)
        except LoracastError as exc:
            return exc
        except Exception as exc:  # a foreign exception: the property fails with it
            raise AssertionError(f"foreign exception {type(exc).__name__}: {exc}") from exc


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@FUZZ
@given(changes=st.dictionaries(field_names, field_values, min_size=1, max_size=3))
def test_any_config_loads_or_raises_a_loracast_error(pair, reference, changes):
    data = {**reference["config"], **changes}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        (folder / CONFIG).write_text(json.dumps(data))
        (folder / WEIGHTS).write_bytes(reference["unbound"])
        result = outcome(pair, folder)
    if isinstance(result, Exception):
        return
    config = result.peft_config["default"]  # accepted: then it must be well formed
    assert _finite(config.lora_alpha) and all(_finite(v) for v in config.alpha_pattern.values())
    assert type(config.r) is int and type(config.qalora_group_size) is int
    assert config.auto_mapping is None or isinstance(config.auto_mapping, dict)
    for field in ("use_rslora", "fan_in_fan_out", "lora_bias", "use_dora", "use_qalora"):
        assert type(getattr(config, field)) is bool


def _header(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _file(header: dict, data: bytes, length_delta: int = 0) -> bytes:
    text = json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", max(0, len(text) + length_delta)) + text + data


tensor_edits = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XX", 3]),
    "shape": st.lists(st.sampled_from([-1, 0, 1, 2, 4, 64, 2**40]), max_size=3) | scalars,
    "data_offsets": st.lists(st.sampled_from([-1, 0, 7, 512, 10**12]), max_size=3) | scalars,
})
fingerprint_edits = st.dictionaries(
    st.sampled_from(["environment", "base_layers", "quantization", "adapter_dtypes", "precision", "model_dtype",
                     "save_dtype", "trainable", "fingerprint_version", "adapter_name"]), json_values, max_size=3)


@FUZZ
@given(edits=st.dictionaries(st.integers(0, 7), tensor_edits, max_size=2), fingerprint=fingerprint_edits,
       fingerprint_text=st.none() | st.sampled_from(["", "[1]", "{", "null", "1" * 5000]),
       digest=st.none() | st.sampled_from(["", "0" * 64, "x"]), length_delta=st.sampled_from([0, 0, 0, -3, 5, 10**9]),
       truncate=st.sampled_from([0, 0, 0, 1, 100]))
def test_any_safetensors_header_loads_or_raises_a_loracast_error(pair, reference, edits, fingerprint,
                                                                  fingerprint_text, digest, length_delta, truncate):
    header, data = _header(reference["weights"])
    metadata = header["__metadata__"]
    keys = sorted(k for k in header if k != "__metadata__")
    for index, edit in edits.items():
        header[keys[index % len(keys)]].update(edit)
    saved_fingerprint = json.loads(metadata["loracast.fingerprint"])
    saved_fingerprint.update(fingerprint)
    metadata["loracast.fingerprint"] = fingerprint_text if fingerprint_text is not None else json.dumps(
        saved_fingerprint, allow_nan=True)
    if digest is not None:
        metadata["loracast.config_sha256"] = digest
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        (folder / CONFIG).write_text(json.dumps(reference["config"]))
        (folder / WEIGHTS).write_bytes(_file(header, data[:len(data) - truncate], length_delta))
        result = outcome(pair, folder)
    intact = not edits and digest is None and length_delta == 0 and truncate == 0
    if intact:  # only the fingerprint changed: a damaged one is ignored, never a reason to refuse
        assert not isinstance(result, Exception), result
