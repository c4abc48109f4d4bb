"""`loracast train classify` in one process against ``torchrun --nproc_per_node 2`` (DDP over gloo), one
invocation, alternating runs; prints medians (min-max) of wall time and training time, and ratios.

    python benchmarks/train_ddp.py --repeats 3            # embedded defaults, one epoch
    python benchmarks/train_ddp.py -- --model DIR --data FILE   # other train options after --

Configurations (same cores in total): one process with 2 threads, one process with 1 thread,
two processes with 1 thread each (torchrun's default OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "src" / "loracast" / "data" / "support_tickets.jsonl"
CONFIGS = {
    "1 process x 2 threads": (1, "2"),
    "1 process x 1 thread": (1, "1"),
    "2 processes x 1 thread (torchrun)": (2, "1"),
}


def run_once(processes: int, threads: str, out: Path, train_args: list[str]) -> dict:
    """One `loracast train`; wall seconds, training seconds and accuracy from its metrics.json."""
    env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=str(REPO / "src"))
    module = ["-m", "loracast", "train", "classify", "--data", str(DATA), "--out", str(out), *train_args]
    if "--batch-size" not in train_args:  # --batch-size is per process: the same global batch of 32
        module += ["--batch-size", str(32 // processes)]
    if processes == 1:
        command = [sys.executable, *module]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   *module]
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - began
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall": wall, "train": metrics["seconds"]["train"], "accuracy": metrics["eval"]["accuracy_after"]}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("train_args", nargs="*", help="options for loracast train (after --)")
    args = parser.parse_args()
    train_args = args.train_args or ["--epochs", "1"]
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # alternate, so load changes hit every configuration alike
            for name, (processes, threads) in CONFIGS.items():
                out = Path(tmp) / f"{processes}_{threads}_{repeat}"
                results[name].append(run_once(processes, threads, out, train_args))
                print(f"  run {repeat + 1}/{args.repeats} {name}: {results[name][-1]}", flush=True)
    print(f"\nloracast train {' '.join(train_args)}; {args.repeats} runs each; seconds, median (min-max)")
    print(f"{'configuration':36s} {'wall':>20s} {'train':>20s}  accuracy after")
    for name, runs in results.items():
        accuracies = ", ".join(f"{r['accuracy']:.3f}" for r in runs)
        print(f"{name:36s} {spread([r['wall'] for r in runs]):>20s} {spread([r['train'] for r in runs]):>20s}  "
              f"{accuracies}")
    ddp = statistics.median(r["train"] for r in results["2 processes x 1 thread (torchrun)"])
    for name in list(CONFIGS)[:2]:
        single = statistics.median(r["train"] for r in results[name])
        print(f"training time, {name} / torchrun 2 processes: {single / ddp:.2f}x")


if __name__ == "__main__":
    main()
