"""Launching multi-process tests: torchrun on the CPU, bounded in time so a hang cannot stall CI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240  # the whole launch; collectives inside fail after LORACAST_DIST_TIMEOUT


def torchrun(args: list[str], nproc: int = 2, timeout: float = TIMEOUT_S,
             env: dict[str, str] | None = None, gpus: bool = False) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc_per_node nproc ARGS`` from the repository root.

    Every process of the launch is killed if it runs past `timeout` (then AssertionError with the
    output so far). The loracast under test comes first on PYTHONPATH. Without `gpus` the workers
    see no GPU, so a launch written for the CPU (gloo) stays there on a GPU machine too.
    """
    full_env = dict(os.environ)
    full_env.update({"PYTHONPATH": os.pathsep.join([str(REPO / "src"), full_env.get("PYTHONPATH", "")]),
                     "LORACAST_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"})
    if not gpus:
        full_env["CUDA_VISIBLE_DEVICES"] = ""
    full_env.update(env or {})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    process = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and every worker: they share its session
        output, _ = process.communicate()
        raise AssertionError(f"torchrun {' '.join(args)} ran past {timeout}s and was killed; output:\n"
                             f"{output[-4000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, output, "")
