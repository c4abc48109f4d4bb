"""scripts/device_check.py on the CPU (``--device cpu --quick``): every stage of the GPU check runs,
so the script cannot rot between GPU runs. Oracle: the files it writes and what they report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import device_check  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device-results")
    done = subprocess.run([sys.executable, "scripts/device_check.py", "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    return done, out


def test_quick_run_passes_every_stage_and_writes_at_most_8_files(quick_run):
    done, out = quick_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["stages"]) == ["environment", "tests", "benchmark", "train"]
    assert {stage["status"] for stage in results["stages"].values()} == {"ok"}
    names = sorted(p.name for p in out.iterdir())  # the device tool brings back at most 8 files
    assert names == ["device_check.log", "gpu_benchmark.json", "gpu_benchmark.md", "results.json", "results.md",
                     "tests_on_device.xml", "train_metrics.json"]  # quick: no second test run
    assert "every stage ok" in done.stdout  # progress is printed as it goes


def test_quick_run_reports_environment_tests_benchmark_and_training(quick_run):
    _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    env = results["stages"]["environment"]["environment"]
    assert env["device"] == "cpu" and env["versions"]["peft"] and env["versions"]["bitsandbytes"]
    counts = results["stages"]["tests"]["counts"]
    assert counts["passed"] >= 1 and counts["failures"] == counts["errors"] == 0
    assert set(results["stages"]["benchmark"]["cases"]) == {
        "frozen base (bound)", "loracast stable", "loracast mixed", "loracast fast", "PEFT fp32 adapters",
        "PEFT bf16 adapters", "QLoRA loracast uint8", "QLoRA PEFT uint8"}
    bench = json.loads((out / "gpu_benchmark.json").read_text())
    assert bench["cases"]["loracast stable"]["adapter_dtype"] == "torch.float32"
    assert bench["cases"]["loracast fast"]["adapter_dtype"] == "torch.bfloat16"
    assert bench["cases"]["frozen base (bound)"]["trainable"] == 0
    assert bench["cases"]["PEFT fp32 adapters"]["latency_s"]["median"] > 0
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics  # written by `loracast train` itself
    table = (out / "results.md").read_text()
    assert "| tests | ok |" in table and "## Benchmark" in table


def test_junit_counts_reads_failures_and_skips(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="2">'
                      '<testcase classname="tests.a" name="t1"><failure message="x"/></testcase>'
                      '<testcase classname="tests.a" name="t2"/></testsuite></testsuites>')
    assert device_check.junit_counts(report) == {
        "counts": {"tests": 4, "failures": 1, "errors": 0, "skipped": 2, "passed": 1}, "failed": ["tests.a::t1"]}
    assert device_check.junit_counts(tmp_path / "missing.xml") == {"counts": None, "failed": []}


def test_unknown_stage_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        device_check.main(["--stages", "tests,bench"])
    assert "unknown bench; choose from environment, tests, benchmark, train" in capsys.readouterr().err
