"""Bringing `LoraConfig` values to one form before they are checked.

PEFT accepts several spellings of one setting (a set or a tuple for a list, None for an empty
dict, its `LoftQConfig` object for a dict); loracast stores one, so the code that reads a config
and the JSON it writes see a single form. Each function returns its argument unchanged when it
does not have a shape it converts: deciding whether a value is valid is the checks' job
(`loracast.config.values`).
"""

from __future__ import annotations

from typing import Any


def as_list(value: Any) -> Any:
    """A set or tuple as a list (a set sorted, as its order is arbitrary)."""
    if isinstance(value, set):
        try:
            return sorted(value)
        except TypeError:  # mixed types cannot be sorted; the check names the field
            return list(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def unique_names(value: Any) -> Any:
    """A collection of strings as a list without repeats (first occurrence kept); a string or
    None unchanged (a regex, or the model type's default)."""
    if isinstance(value, (list, set, tuple)) and all(isinstance(v, str) for v in value):
        return list(dict.fromkeys(as_list(value)))
    return value


def dict_or_empty(value: Any) -> Any:
    """None as an empty dict (PEFT's files write either for "no overrides")."""
    return {} if value is None else value


def loftq_dict(value: Any) -> Any:
    """PEFT's `LoftQConfig` dataclass (or None) as the plain dict PEFT writes."""
    if value is None:
        return {}
    attributes = getattr(value, "__dict__", None)
    if not isinstance(value, dict) and isinstance(attributes, dict):
        return dict(attributes)
    return value


def token_lists(value: Any) -> Any:
    """Token ids given as tuples (alone, or per embedding in a dict) as lists."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
    return value
