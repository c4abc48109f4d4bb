"""The command line catches one error type: every `LoracastError` is a one-line error, exit status 2."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import loracast
from loracast.cli import CommandError
from loracast.cli.commands._common import command_errors


def _loracast_errors() -> list[type]:
    found = set()
    for info in pkgutil.walk_packages(loracast.__path__, "loracast."):
        if info.name == "loracast.__main__":
            continue
        for _, cls in inspect.getmembers(importlib.import_module(info.name), inspect.isclass):
            if issubclass(cls, loracast.LoracastError) and cls is not CommandError:
                found.add(cls)
    return sorted(found, key=lambda c: c.__qualname__)


@pytest.mark.parametrize("error", _loracast_errors(), ids=lambda c: c.__qualname__)
def test_every_loracast_error_becomes_a_command_error(error):
    instance = error.__new__(error)
    Exception.__init__(instance, "adapter.safetensors: something the user can fix\nsecond line")
    with pytest.raises(CommandError, match=r"^adapter.safetensors: something the user can fix$"):
        with command_errors():
            raise instance
