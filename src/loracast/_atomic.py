"""Atomic file writes: readers see the old files or the complete new ones, never a partial one.

Each file is written into a private temporary folder inside its folder (safetensors writes a
temporary file of its own beside the path it is given, which must not be left loose either),
flushed to disk, given the permissions a new file gets, and renamed over the old one; a failure
removes the temporary folder.
`publish_together` does this for several files at once: every file is written and flushed
before the first rename, so a write failure (disk full, a value that cannot be serialised)
publishes nothing. `folder_lock` serialises the writers (and readers) of one folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence

import torch
from safetensors.torch import save_file

try:  # POSIX only; elsewhere writers are not serialised, and a mix is still detected on load
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_TEMP_SUFFIX = ".tmp"


def _temp_path(final_path: str) -> str:
    folder, base = os.path.split(final_path)
    private = tempfile.mkdtemp(prefix=f".{base}.", suffix=_TEMP_SUFFIX, dir=folder or ".")
    return os.path.join(private, base)


def _remove_temp(tmp: str) -> None:
    shutil.rmtree(os.path.dirname(tmp), ignore_errors=True)


def _new_file_mode() -> int:
    # temporary files are created private (0600); the published file gets the usual
    # permissions for a new file (0644 under the common umask), as an ordinary open() would
    mask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return 0o666 & ~mask


def _fsync(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder: str) -> None:
    # makes the renames themselves durable; not every platform can open a folder
    with contextlib.suppress(OSError):
        handle = os.open(folder or ".", os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def write_text(path: str, text: str) -> None:
    """Write `text` to `path` (UTF-8) and flush it to disk."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file` flushed to disk; its I/O failures raised as `OSError`."""
    try:
        save_file(tensors, path, metadata=metadata)
    except OSError:
        raise
    except Exception as exc:
        # safetensors reports I/O failures (disk full, file too large) as its own error type
        raise OSError(f"could not write {path}: {exc}") from exc
    _fsync(path)


def publish_together(files: Sequence[tuple[str, Callable[[str], None]]]) -> None:
    """Write several files so that a failure while writing publishes none of them.

    `files` pairs each final path with a function that writes the complete file to the path it
    is given (a temporary name beside the final one). All are written and flushed first, then
    renamed into place in the order given, so the window in which some but not all are new is
    only between two renames. The temporary folders are removed whatever happens.
    """
    temps: list[str] = []
    try:
        for path, write in files:
            temps.append(_temp_path(path))
            write(temps[-1])
            os.chmod(temps[-1], _new_file_mode())
        for tmp, (path, _) in zip(temps, files):
            os.replace(tmp, path)  # back to back: nothing else runs between the renames
    finally:
        for tmp in temps:
            _remove_temp(tmp)
    for folder in {os.path.dirname(path) for path, _ in files}:
        _fsync_folder(folder)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the complete new one."""
    publish_together([(path, lambda tmp: write_text(tmp, text))])


def atomic_save_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, written to a temporary file and renamed into place.

    Raises:
        OSError: the file could not be written; any earlier file at `path` is unchanged.
    """
    publish_together([(path, lambda tmp: write_safetensors(tmp, tensors, metadata))])


def remove_stale_temps(folder: str, names: Sequence[str]) -> list[str]:
    """Remove the temporary folders an interrupted write of `names` left in `folder`; returns them.

    Call it only while holding `folder_lock(folder)`, so that no live write's file is taken.
    """
    patterns = [re.compile(rf"\.{re.escape(name)}\..+{re.escape(_TEMP_SUFFIX)}") for name in names]
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if any(p.fullmatch(entry.name) for p in patterns):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:  # a temporary file of an earlier loracast
                    _remove_quietly(entry.path)
                removed.append(entry.path)
    return removed


@contextlib.contextmanager
def folder_lock(folder: str, shared: bool = False) -> Iterator[None]:
    """Hold an advisory lock on `folder` itself (no lock file is created): exclusive for a writer,
    `shared` for a reader. The kernel releases it when the process dies, so a killed writer never
    blocks the next one. Where folders cannot be locked (Windows, some network file systems)
    this does nothing."""
    if fcntl is None:
        yield
        return
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError:  # a file system without flock: carry on unserialised
            pass
        yield
    finally:
        os.close(handle)  # closing the descriptor releases the lock


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
