"""`CommandError`, in a module of its own so that every part of the command line (the entry point in
`loracast.cli`, `config_file`, the commands) can import it without importing the entry point."""

from __future__ import annotations

from loracast.errors import LoracastError


class CommandError(LoracastError):
    """A problem with the user's input, reported as one line (exit status 2)."""
