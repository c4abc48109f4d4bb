"""The heap measures of training processes (training/common/heap.py): with the threshold fixed, glibc
keeps serving large blocks with mappings of their own after one was freed (without it, it stops);
a threshold the user set in the environment is left alone; freed heap blocks stay resident until
`return_freed_memory` hands their pages back."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from loracast.training.common.heap import limit_heap_growth

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's allocator only")

# Allocates and frees a 16 MiB block (glibc then raises its mmap threshold to 16 MiB unless it was
# fixed), allocates 8 MiB, and prints whether that block is a mapping of its own.
_PROBE = """
import ctypes, sys
from loracast.training.common.heap import limit_heap_growth
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "limit":
    assert limit_heap_growth()
libc.free(libc.malloc(16 << 20))
block = libc.malloc(8 << 20)
print(libc.mallinfo2().hblkhd >= 8 << 20)
"""


def _mapped_after_free(mode: str) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[2] / "src"), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env,
                            timeout=120, check=True)
    return result.stdout.strip() == "True"


def test_large_blocks_stay_mapped_once_the_threshold_is_fixed():
    assert not _mapped_after_free("default")  # glibc's own rule: the freed 16 MiB raised the threshold
    assert _mapped_after_free("limit")


def test_the_users_own_threshold_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert not limit_heap_growth()


# Fills the heap with 1 MiB blocks (below the fixed threshold: served from the arena), pins its top
# with one more block so that glibc cannot simply shrink it, frees the 1 MiB blocks, and prints the
# resident memory (KiB) after the frees and then after `return_freed_memory` (if asked).
_TRIM_PROBE = """
import ctypes, sys
from loracast.training.common.heap import limit_heap_growth, return_freed_memory
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
assert limit_heap_growth()
blocks = [libc.malloc(1 << 20) for _ in range(256)]
for block in blocks:
    libc.memset(block, 1, 1 << 20)
pin = libc.malloc(1 << 20)  # above the others: the heap's top stays in use
for block in blocks:
    libc.free(block)
freed = rss()
released = return_freed_memory() if sys.argv[1] == "release" else None
print(freed, rss(), released)
"""


def _resident_after_frees(mode: str) -> tuple[int, int, str]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[2] / "src"), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", _TRIM_PROBE, mode], capture_output=True, text=True, env=env,
                            timeout=120, check=True)
    freed, after, released = result.stdout.split()
    return int(freed), int(after), released


def test_freed_heap_pages_go_back_only_when_returned():
    freed, after, _ = _resident_after_frees("keep")
    assert after > freed - 16 * 1024  # glibc alone keeps the 256 MiB of freed blocks resident
    freed, after, released = _resident_after_frees("release")
    assert released == "True"
    assert after < freed - 200 * 1024  # at least 200 of the 256 freed MiB handed back

