"""The classifier job of `loracast train` from two source trees, alternating runs: wall time, CPU
time (user + system of the command), training time and held-out accuracy, medians (min-max).

    python benchmarks/classify_engine.py --tree before=/path/to/old/src --tree after=src --repeats 2

Each run is `python -m loracast train classify` on the shipped support-ticket data with the
job's defaults (extra options after --), in a fresh process; the runs alternate between the trees
so that load from other jobs on the machine falls on both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "src" / "loracast" / "data" / "support_tickets.jsonl"


def run_once(src: Path, out: Path, train_args: list[str]) -> dict:
    """One run of the classifier job from the source tree `src`; its times and final accuracy."""
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "loracast", "train", "classify", "--data", str(DATA), "--out", str(out),
               "--device", "cpu", *train_args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "train": metrics["seconds"]["train"],
            "accuracy": metrics["eval"]["accuracy_after"]}


def spread(values: list[float]) -> str:
    """Median (min-max)."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=SRC",
                        help="a name and a source folder holding the loracast package (repeatable)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the runs and medians here")
    parser.add_argument("train_args", nargs="*", help="options for loracast train (after --)")
    args = parser.parse_args()
    trees = dict(item.split("=", 1) for item in args.tree)
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, src in trees.items():
                result = run_once(Path(src).resolve(), Path(tmp) / f"{name}-{repeat}", args.train_args)
                runs[name].append(result)
                print(f"{name} #{repeat + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
    medians = {name: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for name, rows in runs.items()}
    print(f"{'':12}{'wall s':>22}{'CPU s':>22}{'train s':>22}{'accuracy':>22}")
    for name, rows in runs.items():
        print(f"{name:12}" + "".join(f"{spread([r[k] for r in rows]):>22}" for k in ("wall", "cpu", "train", "accuracy")))
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "medians": medians, "train_args": args.train_args}, indent=2) + "\n")


if __name__ == "__main__":
    main()
