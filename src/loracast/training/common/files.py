"""The output folder of a run and the names of what it holds (``adapter/``, ``metrics.json``, the plots)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loracast._atomic import atomic_write_text
from loracast.training.common.errors import SetupError

ADAPTER_DIR = "adapter"
METRICS_NAME = "metrics.json"
CURVE_NAME = "training_curve.png"
COMPARE_NAME = "compare_precision.png"


def prepare_out(out: Path) -> Path:
    """Create the output folder.

    Raises:
        SetupError: `out` is an existing file, or cannot be created.
    """
    if out.exists() and not out.is_dir():
        raise SetupError(f"--out {str(out)!r} is a file; pass a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SetupError(f"cannot create output folder {str(out)!r}: {exc.strerror or exc}") from exc
    return out


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` as indented JSON, atomically."""
    atomic_write_text(str(path), json.dumps(payload, indent=2, sort_keys=False) + "\n")
