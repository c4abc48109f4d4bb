"""`benchmarks/run.py` runs end to end (seconds-long "quick" sizes) and writes its results, chart
and the targets table; the merge case finds loracast exact and PEFT not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_writes_results_chart_and_targets(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--size", "quick", "--out",
                           str(tmp_path), "--cases", "train_bf16_fp32", "merge", "inject_deep"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads((tmp_path / "results.json").read_text())
    by_case = {r["case"]: r for r in run["results"]}
    assert not [r for r in run["results"] if "error" in r]

    train = by_case["train_bf16_fp32"]
    assert set(train["rows"]) == {"bound", "peft", "exact", "fast"}
    assert all(len(row["times"]) == len(row["cpu"]) >= 2 for row in train["rows"].values())
    assert set(train["memory"]) == {"peft", "loracast"} and set(train["memory"]["loracast"]) == {"exact", "fast"}
    assert run["machine"]["torch_threads"] == 1

    merge = by_case["merge"]["info"]
    for key in ("bfloat16_adapter", "float32_adapter"):
        assert merge["loracast"][key]["off_single_rounding"] == 0
        assert merge["loracast"][key]["unmerge_changed"] == 0
    assert merge["peft"]["bfloat16_adapter"]["unmerge_changed"] > 0  # PEFT's subtractive unmerge drifts

    report = (tmp_path / "RESULTS.md").read_text()
    assert "## Targets" in report and "| merge: elements off a single rounding (bf16 / fp32 adapters) | 0 | 0 / 0 | yes |" in report
    assert "torch threads per worker: 1" in report
    assert (tmp_path / "results.png").stat().st_size > 10_000
