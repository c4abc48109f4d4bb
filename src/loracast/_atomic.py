"""Atomic file writes: readers see the old file or the complete new one, never a partial one.

Each file is written to a private temporary name in its folder, flushed to disk, given the
permissions a new file gets, and renamed over the old one; a failure removes the temporary file.
"""

from __future__ import annotations

import os
import tempfile

import torch
from safetensors.torch import save_file


def _temp_path(final_path: str) -> str:
    folder, base = os.path.split(final_path)
    handle, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder or ".")
    os.close(handle)
    return tmp


def _new_file_mode() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return 0o666 & ~mask


def _publish(tmp: str, path: str) -> None:
    # temporary files are created private (0600); the published file gets the usual
    # permissions for a new file (0644 under the common umask), as an ordinary open() would
    os.chmod(tmp, _new_file_mode())
    os.replace(tmp, path)


def _fsync(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the complete new one."""
    tmp = _temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        _publish(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_save_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, written to a temporary file and renamed into place."""
    tmp = _temp_path(path)
    try:
        save_file(tensors, tmp, metadata=metadata)
        _fsync(tmp)
        _publish(tmp, path)
    except Exception as exc:
        _remove_quietly(tmp)
        if isinstance(exc, OSError):
            raise
        # safetensors reports I/O failures (disk full, file too large) as its own error type
        raise OSError(f"could not write {path}: {exc}; any earlier file there is unchanged") from exc
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
