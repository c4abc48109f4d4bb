"""Measuring tools shared by the benchmark cases: interleaved timing, per-phase peak memory,
summary statistics, and the description of the machine a run used.

Timing: the cores are shared, so the alternatives a case compares run in one process,
interleaved round by round (the order rotates), and are summarised by median and min-max,
as wall time and as the process's CPU time.

Memory: the peak resident set size of one phase (one training step, say) is read from the
kernel's high-water mark after resetting it (``/proc/self/clear_refs``) and after handing
freed heap pages back (``malloc_trim``), so earlier phases do not leak into the figure.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable

_LIBC = None


def _trim_heap() -> None:
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may include freed pages
        pass


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark to its current RSS; False where the kernel does not allow it."""
    gc.collect()
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last `reset_peak_rss` (or since the process started)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def peak_rss_of(fn: Callable[[], object]) -> int:
    """Peak RSS (bytes) of the whole process while `fn` runs."""
    reset_peak_rss()
    fn()
    return peak_rss_bytes()


def interleave(variants: dict[str, tuple[Callable[[], object] | None, Callable[..., object]]], repeats: int,
               warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Time each variant `repeats` times, one of each per round, rotating the order every round.

    `variants` maps a name to (setup or None, fn). setup runs untimed right before fn; when it
    returns something other than None, fn gets that as its argument (a fresh model, say).
    Returns name -> {"wall": seconds per call, "cpu": this process's CPU seconds per call}.
    With one torch thread, CPU time is the work a call does; wall time adds the time spent
    waiting for a shared core. `warmup` untimed rounds come first.
    """
    names = list(variants)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            setup, fn = variants[name]
            arg = setup() if setup is not None else None
            start, cpu_start = time.perf_counter(), time.process_time()
            fn() if arg is None else fn(arg)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            del arg
            if round_index >= warmup:
                times[name]["wall"].append(elapsed)
                times[name]["cpu"].append(cpu)
    return times


def run_child(script: str, argv: list[str], case: str) -> dict:
    """Run `script` again in a fresh Python process with ``--child CASE`` appended and return the
    JSON object it prints last (one measurement, untouched by this process's imports and caches).

    Raises:
        RuntimeError: the child failed (its stderr's tail included).
    """
    command = [sys.executable, os.path.abspath(script), *argv, "--child", case]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"the {case} run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    import json

    return json.loads(done.stdout.strip().splitlines()[-1])


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, where the OS reports them."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed
        return "not installed"


def _loracast_version() -> str:
    try:
        import loracast

        return loracast.__version__
    except ImportError:
        return "not importable (run with PYTHONPATH=src)"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, object]:
    """What a results file needs to say about where it was measured."""
    import torch

    isa = ""
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        pass
    total_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_capability": isa, "memory_gib": round(total_mem / 2**30, 1), "python": sys.version.split()[0],
        "platform": platform.platform(), "torch": torch.__version__, "transformers": _version("transformers"),
        "peft": _version("peft"), "bitsandbytes": _version("bitsandbytes"), "loracast": _loracast_version(),
        "loracast_commit": _git_commit(),
    }
