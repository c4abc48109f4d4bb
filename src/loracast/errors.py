"""Exceptions that name what is at fault and how to fix it.

Every exception loracast raises on purpose is a `LoracastError`, so callers (and the CLI) catch
one type; each is also a `ValueError`, as it was before the family existed.
"""

from __future__ import annotations

from typing import Any


class LoracastError(ValueError):
    """Base of every loracast exception: the message names the thing at fault and the fix."""


class ConfigError(LoracastError):
    """A `LoraConfig` field (or `adapter_config.json` entry) is invalid.

    Attributes:
        field: the offending field name.
        value: the value found.
        expected: what the field accepts, and the fix.
        source: the file the value was read from, when it came from one.
    """

    def __init__(self, field: str, value: Any, expected: str, source: str | None = None) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        self.source = source
        try:
            shown = repr(value)
        except Exception:  # a value whose repr fails must not hide the error about it
            shown = f"<{type(value).__name__}>"
        if len(shown) > 120:
            shown = shown[:117] + "..."
        where = f"{source}: " if source else ""
        super().__init__(f"{where}LoraConfig field {field!r} is {shown}; expected {expected}")

    def in_file(self, source: str) -> ConfigError:
        """The same error, naming the file the value was read from."""
        return ConfigError(self.field, self.value, self.expected, source=source)


class AdapterLoadError(LoracastError):
    """A saved adapter does not fit the model it is loaded into, or cannot be read safely."""


class UnsupportedArgumentError(LoracastError, TypeError):
    """An argument of PEFT's API that loracast does not implement was given a value that would
    need it (also a `TypeError`, what an unexpected argument raised before)."""


class PrecisionError(LoracastError):
    """A requested dtype combination cannot be honoured."""


class PrecisionWarning(UserWarning):
    """Something about dtypes will make results differ from what the user expects (e.g. an adapter
    loaded in an environment other than the one it was saved in)."""


class AdapterStateError(LoracastError, RuntimeError):
    """An operation does not fit the adapters' current state (merged, disabled); the message says
    what to call first."""
