"""What the data of both jobs shares: the split names a row may carry, and the checks of its rows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from loracast.training.common.errors import DataError

TRAIN_SPLITS = frozenset({"train"})
EVAL_SPLITS = frozenset({"test", "eval", "validation", "dev"})


def require_every_split(examples: Sequence, source: str) -> None:
    """Refuse a file where some rows (objects with ``split`` and ``line``) have a split and others not.

    Raises:
        DataError: naming the first row without one.
    """
    row = next((e for e in examples if e.split is None), None)
    if row is not None:
        raise DataError(f"{source}: line {row.line} has no split while other rows do; give every row a split "
                        "or drop the field")


def parse_json_object(raw: str, path: Path, number: int, example: str) -> dict:
    """Line `number` of a JSON-lines file as an object.

    Raises:
        DataError: it is not valid JSON, or not an object (`example` shows the expected shape).
    """
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg} at column {exc.colno}); each line must "
                        f"be one object such as {example}") from exc
    if not isinstance(record, dict):
        raise DataError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object such as {example}")
    return record
