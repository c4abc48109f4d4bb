"""Adapter names: which strings may name an adapter (not `BASE_ONLY`, the per-sample "no adapter" name
that `loracast.layers.routing` defines)."""

from __future__ import annotations

import re
from typing import Any

from loracast.errors import LoracastError
from loracast.layers.routing import BASE_ONLY

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


def check_adapter_name(name: Any) -> str:
    """Return `name` if it can name an adapter (a module key and a folder name).

    Raises:
        ValueError: it is empty, reserved, or holds characters other than letters, digits, '_' and '-'.
    """
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name == BASE_ONLY:
        raise LoracastError(f"adapter name {name!r} is not allowed: use letters, digits, '_' and '-' (it becomes a "
                            f"module key and a folder name), not starting with '-', and not {BASE_ONLY!r}")
    return name
