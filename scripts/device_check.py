"""The GPU check in one command: the test suite on CUDA, the GPU benchmark against PEFT, and the
main job (`loracast train`) on the GPU; writes ``device-results/``.

    python3 scripts/device_check.py                        # on a machine with one CUDA GPU (< 8 minutes)
    python scripts/device_check.py --device cpu --quick    # the same code paths on the CPU (about 30 s of CPU time)

Stages, each a child process with its own time limit, run in this order, whatever the one before
gave (a stage that fails or runs out of time is recorded as such, and the next one runs):

1. ``environment``: GPU name, driver, CUDA, torch, transformers, PEFT, bitsandbytes versions.
2. ``tests``: ``LORACAST_TEST_DEVICE=cuda python -m pytest``: the files that build on the device
   first, then the rest (with ``--quick``, a few tests of tests/test_cuda_paths.py); counts read
   from pytest's JUnit XML reports.
3. ``benchmark``: ``benchmarks/gpu.py``, loracast against PEFT in one process.
4. ``train``: ``loracast train`` on a model of SmolLM2-135M's shape with random weights (the real
   file cannot travel to the GPU machine; same code path, timing only), with a word-level
   tokenizer built from the shipped data.

Wheels: where ``device/wheels/`` holds ``*.whl`` files (bitsandbytes and PEFT for a machine that
lacks them and reaches no registry; device/README.md says how to download them), they are
installed with ``pip install --no-deps --no-index --target`` into a folder put first on the
children's PYTHONPATH. Outputs in ``--out`` (default device-results/), at most 8 files:
results.json, results.md, gpu_benchmark.json, gpu_benchmark.md, tests_on_device.xml, tests_rest.xml,
train_metrics.json and device_check.log (everything the children printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "device" / "wheels"
DATA = ROOT / "src" / "loracast" / "data" / "support_tickets.jsonl"
# Seconds per stage on the GPU: together under 8 minutes, so that a rerun fits in a 15-minute lease.
LIMITS = {"environment": 40, "tests": 170, "benchmark": 170, "train": 60}
QUICK_LIMIT = 300  # --quick on shared CPU cores: a stage is slow only when the cores are busy
QUICK_TESTS = ["tests/test_cuda_paths.py", "-k", "dtypes_and_devices and float32"]
# SmolLM2-135M's architecture (its config.json): a Llama of 30 layers, hidden 576, 9 heads, 3 key-value heads.
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                     rms_norm_eps=1e-5, tie_word_embeddings=True)
QUICK_SHAPE = dict(SMOLLM2_SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)


class Log:
    """Prints progress lines and keeps everything in device_check.log."""

    def __init__(self, path: Path) -> None:
        self.handle = path.open("w")
        self.start = time.monotonic()

    def __call__(self, line: str, echo: bool = True) -> None:
        stamped = f"[{time.monotonic() - self.start:6.1f}s] {line}"
        self.handle.write(stamped + "\n")
        self.handle.flush()
        if echo:
            print(stamped, flush=True)


def run_child(command: list[str], env: dict[str, str], limit: float, log: Log) -> dict[str, Any]:
    """Run `command` from the repository root, streaming its output to `log`; the child and all it
    started are killed once it has run `limit` seconds."""
    log(f"$ {' '.join(command)}")
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the child and its children (torchrun workers)
        except ProcessLookupError:
            pass

    timer = threading.Timer(limit, kill)
    timer.start()
    tail: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            tail = (tail + [line.rstrip()])[-40:]
            log(f"  {line.rstrip()}")
        process.wait()
    finally:
        timer.cancel()
    seconds = time.monotonic() - start
    status = "timed out" if expired.is_set() else ("ok" if process.returncode == 0 else "failed")
    log(f"{status} in {seconds:.1f}s (exit status {process.returncode})")
    return {"status": status, "seconds": round(seconds, 1), "returncode": process.returncode, "output_tail": tail[-15:]}


def install_wheels(target: Path, log: Log) -> list[str]:
    """Install device/wheels/*.whl into `target` (no dependencies, no index); the wheels installed."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        log(f"no wheels in {WHEELS.relative_to(ROOT)}: using the packages installed here")
        return []
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)]
    done = run_child(command, dict(os.environ), 120, log)
    if done["status"] != "ok":
        raise SystemExit(f"device_check: installing {[w.name for w in wheels]} failed: wheels for another Python "
                         f"or platform? This is Python {platform.python_version()} on {platform.machine()}; "
                         "see device/README.md")
    return [w.name for w in wheels]


@dataclass(frozen=True)
class Run:
    """What every stage needs: the results folder, the children's environment, the device, the mode, the log."""

    out: Path
    env: dict[str, str]
    device: str
    quick: bool
    log: Log


def child_env(site: Path | None, device: str, quick: bool) -> dict[str, str]:
    """The children's environment: the installed wheels and this tree's loracast first on PYTHONPATH
    (and, for `quick` runs on shared cores, one thread per child: tiny shapes gain nothing from more)."""
    env = dict(os.environ)
    paths = ([str(site)] if site is not None else []) + [str(ROOT / "src"), str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(LORACAST_TEST_DEVICE=device, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if quick:
        env["OMP_NUM_THREADS"] = "1"
    return env


def environment_stage(run: Run, limit: float) -> dict[str, Any]:
    """GPU, driver and library versions (benchmarks/gpu.py's `environment`)."""
    code = ("import json, sys, torch; sys.path.insert(0, 'benchmarks'); import gpu; "
            "print('ENV ' + json.dumps(gpu.environment(torch.device(sys.argv[1]))))")
    done = run_child([sys.executable, "-c", code, run.device], run.env, limit, run.log)
    lines = [line for line in done.pop("output_tail") if line.startswith("ENV ")]
    done["environment"] = json.loads(lines[-1][4:]) if lines else None
    return done


def tests_stage(run: Run, limit: float) -> dict[str, Any]:
    """The test suite on the device, in two runs so that a slow suite cannot hide the device's own
    results: first the files that build on the device (conftest's DEVICE_MODULES; with --quick, a
    few of their tests), then every other file in what is left of `limit`."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import DEVICE_MODULES

    device_files = [f"tests/{name}" for name in sorted(DEVICE_MODULES)]
    parallel = ["-n", "8", "--dist", "loadfile"] if importlib.util.find_spec("xdist") is not None else []
    runs = {"on_device": QUICK_TESTS if run.quick else [*parallel, *device_files]}
    if not run.quick:
        runs["rest"] = [*parallel, "tests", *(f"--ignore={path}" for path in device_files)]
    out: dict[str, Any] = {"status": "ok", "seconds": 0.0, "runs": {}}
    for name, selection in runs.items():
        report = run.out / f"tests_{name}.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra",
                   f"--junitxml={report}", *selection]
        done = run_child(command, run.env, max(10.0, limit - out["seconds"]), run.log)
        done.pop("output_tail")
        done.update(junit_counts(report))
        out["runs"][name] = done
        out["seconds"] = round(out["seconds"] + done["seconds"], 1)
        if done["status"] != "ok":
            out["status"] = done["status"]
    out["counts"] = {key: sum((r["counts"] or {}).get(key, 0) for r in out["runs"].values())
                     for key in ("tests", "failures", "errors", "skipped", "passed")}
    out["failed"] = [test for r in out["runs"].values() for test in r["failed"]]
    return out


def junit_counts(report: Path) -> dict[str, Any]:
    """Counts (tests, failures, errors, skipped) and failed test ids from a pytest JUnit XML file."""
    if not report.is_file():
        return {"counts": None, "failed": []}
    root = ElementTree.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"counts": counts, "failed": failed}


def benchmark_stage(run: Run, limit: float) -> dict[str, Any]:
    """benchmarks/gpu.py; its targets as measured."""
    command = [sys.executable, "benchmarks/gpu.py", "--device", run.device, "--out", str(run.out)]
    done = run_child(command + (["--quick"] if run.quick else []), run.env, limit, run.log)
    path = run.out / "gpu_benchmark.json"
    if path.is_file():
        results = json.loads(path.read_text())
        done.update(cases=sorted(results["cases"]), targets=results["targets"])
    return done


def write_model_folder(folder: Path, quick: bool) -> None:
    """A Llama of SmolLM2-135M's shape (tiny with `quick`) with random weights, and a word-level
    tokenizer of the shipped data's words: a model folder `loracast train --model` accepts."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for line in DATA.read_text().splitlines() for w in json.loads(line)["text"].lower().split()})
    specials = ["<unk>", "<pad>", "</s>"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(folder)
    config = LlamaConfig(**(QUICK_SHAPE if quick else SMOLLM2_SHAPE), pad_token_id=1, eos_token_id=2, bos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)


def train_command(model: Path, data: Path, out: Path, device: str, quick: bool) -> list[str]:
    """`loracast train` as main's command line has it (see `loracast train --help`): kept here, in one
    place, so a change of the command means one edit."""
    command = [sys.executable, "-m", "loracast", "train", "--model", str(model), "--data", str(data),
               "--out", str(out), "--device", device, "--dtype", "bf16", "--precision", "stable", "--epochs", "1"]
    return command + (["--batch-size", "16", "--max-length", "16"] if quick else [])


def train_stage(run: Run, limit: float) -> dict[str, Any]:
    """The main job on the device, on a random-weight SmolLM2-shaped model."""
    with tempfile.TemporaryDirectory(prefix="loracast-device-train-") as work:
        model, run_out, data = Path(work) / "model", Path(work) / "out", Path(work) / "data.jsonl"
        started = time.monotonic()
        write_model_folder(model, run.quick)
        lines = DATA.read_text().splitlines()
        data.write_text("\n".join(lines[::20] if run.quick else lines) + "\n")  # quick: every twentieth row
        run.log(f"train: model folder written in {time.monotonic() - started:.1f}s "
            f"({'tiny' if run.quick else 'SmolLM2-135M'} shape, random weights)")
        done = run_child(train_command(model, data, run_out, run.device, run.quick), run.env, limit, run.log)
        metrics = next(iter(sorted(run_out.rglob("metrics.json"))), None) if run_out.exists() else None
        if metrics is not None:
            shutil.copy(metrics, run.out / "train_metrics.json")
        done["metrics"] = "train_metrics.json" if metrics is not None else None
    return done


STAGES: dict[str, Callable[[Run, float], dict[str, Any]]] = {
    "environment": environment_stage, "tests": tests_stage, "benchmark": benchmark_stage, "train": train_stage}


def markdown(results: dict[str, Any], out: Path) -> str:
    """results.md: the stages, the environment, and the benchmark's tables."""
    env = (results["stages"].get("environment") or {}).get("environment") or {}
    versions = env.get("versions") or {}
    lines = ["# Device check", "",
             f"- machine: {env.get('gpu') or env.get('device') or 'unknown'}"
             + (f", driver {env.get('driver')}, CUDA {env.get('cuda')}" if env.get("gpu") else ""),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
             f"- wheels installed: {', '.join(results['wheels']) or 'none'}",
             f"- mode: {'quick' if results['quick'] else 'full'}, device {results['device']}, "
             f"total {results['seconds']:.0f}s", "",
             "| stage | status | seconds | detail |", "|---|---|---|---|"]
    for name, stage in results["stages"].items():
        detail = ""
        if name == "tests" and stage.get("counts"):
            c = stage["counts"]
            detail = f"{c['passed']} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped"
            if stage["failed"]:
                detail += ": " + ", ".join(stage["failed"][:8]) + (" ..." if len(stage["failed"]) > 8 else "")
        elif name == "benchmark" and stage.get("targets"):
            detail = ", ".join(f"{t['case']}/{t['reference']} {t['what']} "
                               f"{'-' if t['ratio'] is None else format(t['ratio'], '.2f')}" for t in stage["targets"])
        lines.append(f"| {name} | {stage['status']} | {stage['seconds']} | {detail} |")
    bench = out / "gpu_benchmark.md"
    if bench.is_file():
        lines += ["", "## Benchmark", "", bench.read_text()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and a few tests: every stage in seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "device-results", help="results folder (default device-results)")
    parser.add_argument("--stages", default="environment,tests,benchmark,train",
                        help="comma-separated stages to run (default all)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(LIMITS))
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(LIMITS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "device_check.log")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loracast-device-site-") as site:
        wheels = install_wheels(Path(site), log)
        run = Run(args.out, child_env(Path(site) if wheels else None, args.device, args.quick), args.device, args.quick, log)
        results: dict[str, Any] = {"device": args.device, "quick": args.quick, "wheels": wheels, "stages": {}}
        for name in stages:
            limit = QUICK_LIMIT if args.quick else LIMITS[name]
            log(f"== {name} (limit {limit}s)")
            try:
                results["stages"][name] = STAGES[name](run, limit)
            except Exception as exc:  # this script's own part of a stage (the train stage's model folder, say)
                log(f"{name} failed before or after its child: {type(exc).__name__}: {exc}")
                results["stages"][name] = {"status": "failed", "seconds": 0.0, "error": f"{type(exc).__name__}: {exc}"}
    results["seconds"] = round(time.monotonic() - started, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(results, args.out))
    failed = [name for name, stage in results["stages"].items() if stage["status"] != "ok"]
    log(f"done in {results['seconds']:.0f}s: {', '.join(failed) + ' not ok' if failed else 'every stage ok'}; "
        f"results in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
