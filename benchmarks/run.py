"""loracast against PEFT, side by side, in one invocation: `make bench` (or this script).

Every case runs in a fresh Python process that holds both libraries' models (built from the
same weights) and times them interleaved, round by round, after a warm-up: on shared cores the
two see the same load, so the per-round ratio loracast / PEFT is the figure to read. Peak
memory of a training step is measured in one more fresh process per library (alone, so the
other library's model is not resident). Writes, next to this file unless --out says otherwise:
RESULTS.md (tables, targets, machine), results.json (every number) and results.png (chart).

    PYTHONPATH=src python benchmarks/run.py                 # the full run, ~7 minutes on 2 cores
    PYTHONPATH=src python benchmarks/run.py --cases train_bf16_fp32 infer --repeats 3
    PYTHONPATH=src python benchmarks/run.py --size quick --out /tmp/bench   # a seconds-long smoke run

The cores are shared and timings are noisy: read medians with their min-max, and the per-round
ratios (against PEFT, against the frozen base) as the steadier figures. Workers run
single-threaded unless --threads says otherwise (see --help for why).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPEATS = {  # timed repeats per case in a full run (about 7 minutes on 2 cores)
    "inject_deep": 9, "inject_meta": 7, "save_load": 9, "train_bf16_fp32": 8, "train_bf16_bf16": 8,
    "train_fp32_fp32": 4, "infer": 15, "merge": 1, "qlora": 6,
}
IMPLS = ("peft", "loracast")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(REPEATS), default=list(REPEATS), help="cases to run")
    parser.add_argument("--size", choices=("full", "quick"), default="full", help="model sizes (quick: smoke test)")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats per case (0: the per-case default)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker (default 1; 0: torch's default, one per core). On shared "
                             "cores a multi-threaded step waits for its slowest thread at every op, which "
                             "turns other people's load into noise far larger than the effects measured")
    parser.add_argument("--out", default=HERE, help="folder for RESULTS.md, results.json, results.png")
    parser.add_argument("--worker", metavar="CASE", help=argparse.SUPPRESS)
    parser.add_argument("--memory", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _worker(args: argparse.Namespace) -> int:
    """Run one case (both libraries) or one memory measurement (one library) in this process;
    print its JSON on the last line."""
    import torch

    from cases import CASES, MEMORY, quiet
    from harness import peak_rss_bytes
    from models import SIZES

    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    start = time.perf_counter()
    if args.memory:
        case, impl = args.memory
        result = {"case": case, "impl": impl, "peak_rss": MEMORY[case](impl, size)}
    else:
        case = args.worker
        repeats = args.repeats or (REPEATS[case] if args.size == "full" else 2)
        result = CASES[case](size, repeats)
        result["case"] = case
    result.update(wall_s=time.perf_counter() - start, process_peak_rss=peak_rss_bytes(),
                  threads=torch.get_num_threads())
    print(json.dumps(result))
    return 0


def _subprocess(flags: list[str], args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.join(HERE, "run.py"), *flags, "--size", args.size,
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(HERE), "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-3000:] or f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_case(case: str, index: int, args: argparse.Namespace, log) -> dict:
    """A case's timings (one fresh process, both libraries) and, where it has them, each library's
    step memory (one fresh process per library, alternating which goes first)."""
    from cases import MEMORY

    log(f"{case}: timing both libraries")
    result = _subprocess(["--worker", case], args)
    result["case"] = case
    if case in MEMORY and "error" not in result and "skipped" not in result:
        result["memory"] = {}
        for impl in (IMPLS if index % 2 == 0 else IMPLS[::-1]):
            log(f"{case}: peak memory of {impl}")
            measured = _subprocess(["--memory", case, impl], args)
            if "error" in measured:
                result.setdefault("memory_errors", {})[impl] = measured["error"]
            else:
                result["memory"][impl] = measured["peak_rss"]
    if "error" in result:
        log(f"    failed: {result['error'].splitlines()[-1]}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker or args.memory:
        return _worker(args)
    from harness import load_average, machine
    from report import write_report

    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    load_before = load_average()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {message}", flush=True)

    results = [run_case(case, index, args, log) for index, case in enumerate(args.cases)]
    info = machine()
    info["torch_threads"] = next((r["threads"] for r in results if "threads" in r), info["torch_threads"])
    run = {"machine": info, "size": args.size, "load_before": load_before, "load_after": load_average(),
           "wall_s": time.time() - started, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "results": results,
           "command": " ".join(["benchmarks/run.py"] + (argv if argv is not None else sys.argv[1:]))}
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(run, handle, indent=1)
    path = write_report(run, args.out)
    print(f"wrote {path} in {run['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
