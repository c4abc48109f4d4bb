"""The shape of a well-formed precision fingerprint, checked before anything reads it.

A fingerprint comes from a file header, which anyone may have edited or damaged; the comparison
on load and `precision="match-training"` must never meet a value of an unexpected type. Each
known entry has a check here; unknown entries (a newer loracast) are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loracast.dtypes import dtype_from_name

_SCALARS = (str, int, float, bool, type(None))
# what an adapter's layers computed: one mode, or "mixed" with the paths of its "fast" layers
LORA_COMPUTE_MODES = ("exact", "fast", "mixed")


def _is_str_map(value: Any, values: tuple[type, ...]) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, values) for k, v in value.items())


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _float_dtype_name(value: Any) -> bool:
    dtype = dtype_from_name(value) if isinstance(value, str) else None
    return dtype is not None and dtype.is_floating_point


def _check_precision(value: Any) -> str | None:
    if value is None:
        return None
    fast_layers = value.get("fast_layers") if isinstance(value, dict) else None
    plain = {k: v for k, v in value.items() if k != "fast_layers"} if isinstance(value, dict) else value
    if not _is_str_map(plain, _SCALARS):
        return "an object of plain values or null"
    if fast_layers is not None and not _is_str_list(fast_layers):
        return "'fast_layers' a list of module paths"
    if value.get("lora_compute", "exact") not in LORA_COMPUTE_MODES:
        return f"'lora_compute' one of {LORA_COMPUTE_MODES}"
    return None


def _check_quantization(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        return "an object or null"
    if not isinstance(value.get("requantized_merges", 0), int):
        return "'requantized_merges' an integer"
    for key in ("backends", "storage", "compute", "layer_configs"):
        if key in value and not _is_str_list(value[key]):
            return f"{key!r} a list of strings"
    config = value.get("config")
    if config is not None and not _is_str_map(config, _SCALARS):
        return "'config' an object of plain values or null"
    return None


def _check_adapter_dtypes(value: Any) -> str | None:
    if not _is_str_map(value, (str,)):
        return "an object mapping tensor names to dtype names"
    bad = [key for key, name in value.items() if not _float_dtype_name(name)]
    if bad:
        return f"floating dtype names (e.g. 'float32'); {bad[0]!r} has {value[bad[0]]!r}"
    return None


def _expect(test: Callable[[Any], bool], what: str) -> Callable[[Any], str | None]:
    return lambda value: None if test(value) else what


# entry -> check returning None when well formed, else what the entry should be
_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "fingerprint_version": _expect(lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "adapter_name": _expect(lambda v: isinstance(v, str), "a string"),
    "environment": _expect(lambda v: _is_str_map(v, (str, type(None))), "an object of version strings"),
    "precision": _check_precision,
    "model_dtype": _expect(lambda v: v is None or isinstance(v, str), "a dtype name or null"),
    "base_layers": _expect(lambda v: _is_str_map(v, (str,)), "an object mapping layer names to dtype strings"),
    "quantization": _check_quantization,
    "adapter_dtypes": _check_adapter_dtypes,
    "save_dtype": _expect(lambda v: v is None or _float_dtype_name(v), "a floating dtype name or null"),
    "trainable": _expect(lambda v: isinstance(v, bool), "true or false"),
}


def fingerprint_problem(fingerprint: dict[str, Any]) -> str | None:
    """None when every known entry of `fingerprint` is well formed, else which one is not and why."""
    for key, check in _CHECKS.items():
        if key in fingerprint:
            wrong = check(fingerprint[key])
            if wrong is not None:
                return f"entry {key!r} should be {wrong}"
    return None
