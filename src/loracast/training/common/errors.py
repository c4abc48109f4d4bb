"""The errors a `loracast train` run reports as one line: bad data, and a run that cannot be set up."""

from __future__ import annotations

from loracast.errors import LoracastError


class DataError(LoracastError):
    """A data file cannot be used; the message names the file, the row and the fix."""


class SetupError(LoracastError):
    """A run cannot be set up as asked; the message says what to change."""
