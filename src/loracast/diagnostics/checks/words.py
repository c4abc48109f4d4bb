"""Wording shared by the checks' titles and lists: counts, sizes, names grouped by layer index."""

from __future__ import annotations

import re
from collections import Counter

from loracast.diagnostics.report import count

__all__ = ["count", "grouped", "size"]

_INDEX = re.compile(r"\.\d+\.")


def grouped(names: list[str]) -> list[str]:
    """Names that differ only by a layer index, listed once: 'model.layers.*.mlp.weight (x24)'."""
    counts = Counter(_INDEX.sub(".*.", name) for name in names)
    return [name if n == 1 else f"{name} (x{n})" for name, n in counts.items()]


def size(nbytes: int) -> str:
    """'3.2 MiB', '48 KiB', '512 bytes'."""
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.1f} MiB"
    return f"{nbytes / 1024:.0f} KiB" if nbytes >= 1024 else f"{nbytes} bytes"
