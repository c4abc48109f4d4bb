"""The C heap of a training process, kept from holding on to freed activations.

glibc serves a request above its mmap threshold with a mapping of its own, handed back to the
system when freed, and smaller ones from its heap arenas, which keep freed space for reuse.
The threshold starts at 128 KiB, but glibc raises it each time a mapped block is freed, up to
32 MiB: after the first training step every activation tensor (1-5 MB for a small LLM) comes
from the arenas, and since batches differ in length, the freed blocks of one step rarely fit
the next step's tensors. The process's resident memory then grows well past what any one
step uses. Two measures, both for `loracast train`:

- `limit_heap_growth` fixes the threshold at 4 MiB: the step's large tensors are mapped afresh
  each time and handed back when freed;
- `return_freed_memory` (glibc's ``malloc_trim``) hands back the pages of the arenas' free
  blocks. The SFT trainer calls it after each evaluation, whose generation caches training does
  not reuse, and not after each step: on SmolLM2-135M (60 steps of 8, one thread) calling it after
  every step lowered the run's peak from 3,234 to 2,810 MiB, but the next step faults every page
  it handed back in again, and steps took 1.13-1.38x as long (two threads, alternating runs).
"""

from __future__ import annotations

import ctypes
import os
import platform
from functools import cache
from typing import Any

# mallopt's parameter number for the mmap threshold (glibc's malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 2**20


@cache
def _glibc() -> Any | None:
    """The C library when it is glibc (whose mallopt and malloc_trim these calls are), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def limit_heap_growth(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process, so that freed large
    tensors are returned to the system (see the module docstring). True where it was set; False
    on a C library other than glibc, or where ``MALLOC_MMAP_THRESHOLD_`` already chooses it."""
    libc = _glibc()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None or libc is None:
        return False
    try:
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except AttributeError:
        return False


def return_freed_memory() -> bool:
    """Hand the unused pages of the C heap's free blocks back to the system (see the module
    docstring). True where glibc released some; False where it had none, or elsewhere than glibc."""
    libc = _glibc()
    if libc is None:
        return False
    try:
        return bool(libc.malloc_trim(0))
    except AttributeError:
        return False

