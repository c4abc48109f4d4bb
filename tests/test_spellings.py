"""Behaviour of the facts that now have one source: dtype names, accelerate's spellings of true,
and quantized layers recognised through their backend."""

from __future__ import annotations

import pytest
import torch

from loracast import LoracastError, LoraConfig, PrecisionError, get_peft_model
from loracast.diagnostics import doctor
from loracast.dtypes import dtype_from_name, dtype_name, parse_dtype, short_dtype_name


@pytest.mark.parametrize(("name", "dtype"), [
    ("bf16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16), ("BFloat16", torch.bfloat16),
    ("fp16", torch.float16), ("half", torch.float16), ("float", torch.float32), ("fp64", torch.float64),
    ("double", torch.float64), (torch.float32, torch.float32), (None, None),
])
def test_parse_dtype_reads_every_spelling(name, dtype):
    assert parse_dtype(name) == dtype


@pytest.mark.parametrize(("value", "message"), [
    ("bf17", r"save_dtype='bf17' is not a known floating dtype"),
    ("int8", r"save_dtype='int8' is not a known floating dtype"),
    (torch.uint8, r"save_dtype=uint8 is not a floating dtype"),
])
def test_parse_dtype_refuses_with_a_loracast_error(value, message):
    with pytest.raises(PrecisionError, match=message) as info:
        parse_dtype(value, "save_dtype")
    assert isinstance(info.value, LoracastError)


def test_recorded_names_read_back_and_shorten():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int8, torch.float8_e4m3fn):
        assert dtype_from_name(dtype_name(dtype)) == dtype
    assert [short_dtype_name(n) for n in ("bfloat16", "float32", "uint8", None)] == ["bf16", "fp32", "uint8", "-"]


@pytest.mark.parametrize("spelling", ["1", "true", "TRUE", "yes", "y", "on", "t"])
def test_doctor_reads_every_spelling_accelerate_accepts(make_llama, monkeypatch, spelling):
    """accelerate's str_to_bool takes six spellings of true; the doctor took two of them before."""
    model = get_peft_model(make_llama(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"]))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", spelling)
    assert "fsdp-mixed-dtypes" in doctor(model).ids
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert "fsdp-mixed-dtypes" not in doctor(model).ids
