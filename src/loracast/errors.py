"""Exceptions that name what is at fault and how to fix it."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A `LoraConfig` field (or `adapter_config.json` entry) is invalid.

    Attributes:
        field: the offending field name.
        value: the value found.
    """

    def __init__(self, field: str, value: Any, expected: str) -> None:
        self.field = field
        self.value = value
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"LoraConfig field {field!r} is {shown}; expected {expected}")


class AdapterLoadError(ValueError):
    """A saved adapter does not fit the model it is loaded into, or cannot be read safely."""


class PrecisionError(ValueError):
    """A requested dtype combination cannot be honoured."""


class PrecisionWarning(UserWarning):
    """Something about dtypes will make results differ from what the user expects (e.g. an adapter
    loaded in an environment other than the one it was saved in)."""
