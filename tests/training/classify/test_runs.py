"""`loracast train classify` for real runs, on a tiny BERT: checkpoints and exact resume,
evaluation during training with the best adapter kept, a config file, and the one-line refusals.

Oracle for resuming: the uninterrupted run (bit for bit). A checkpoint that run wrote half-way is
what a killed run leaves (checkpoints count only once complete: `common.checkpoints`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loracast.cli import main
from tests.cli.test_errors import assert_one_line_error

# 80 train rows in batches of 16: 5 steps an epoch
RUN = ["--batch-size", "16", "--lr", "1e-2", "--max-length", "32", "--device", "cpu", "--max-steps", "8"]


def _train(model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["train", "classify", "--model", str(model), "--data", str(data), "--out", str(out), *RUN, *extra])


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_resume_from_a_checkpoint_gives_the_uninterrupted_adapter_bit_for_bit(tmp_path, tiny_bert, tiny_data):
    whole = tmp_path / "whole"
    assert _train(tiny_bert, tiny_data, whole, "--save-steps", "4") == 0
    root = whole / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-4", "checkpoint-8"]
    assert (root / "checkpoint-4" / "loracast_checkpoint.json").is_file()
    assert not (root / "checkpoint-4" / "model.safetensors").exists()  # adapter-only
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "checkpoint-4", resumed / "checkpoints" / "checkpoint-4")
    assert _train(tiny_bert, tiny_data, resumed, "--save-steps", "4", "--resume") == 0
    a, b = _adapter(whole), _adapter(resumed)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["train"]["resumed_from"].endswith("checkpoint-4")
    assert [s["step"] for s in metrics["history"]["steps"]] == list(range(1, 9))  # the whole history


def test_resume_refusals(tmp_path, tiny_bert, tiny_data, capsys):
    out = tmp_path / "none"
    assert _train(tiny_bert, tiny_data, out, "--resume") == 2
    assert_one_line_error(2, capsys.readouterr().err, "train", "--resume", "no complete checkpoint")
    assert not out.exists()  # nothing half-written
    first = tmp_path / "first"
    assert _train(tiny_bert, tiny_data, first, "--save-steps", "4", "--max-steps", "4") == 0
    capsys.readouterr()
    assert _train(tiny_bert, tiny_data, first, "--resume", "--r", "4") == 2
    assert_one_line_error(2, capsys.readouterr().err, "train", "another run", "--r")


def test_eval_steps_and_load_best_from_a_config_file(tmp_path, tiny_bert, tiny_data):
    config = tmp_path / "run.yaml"
    config.write_text("eval_steps: 2\nload_best: true\nsave_total_limit: 1\nwarmup_ratio: 0.0\n"
                      "lr_scheduler: constant\ngrad_accum: 1\n", encoding="utf-8")
    out = tmp_path / "best"
    assert _train(tiny_bert, tiny_data, out, "--config", str(config)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    evals = metrics["history"]["evals"]
    assert [e["step"] for e in evals] == [0, 2, 4, 6, 8, 8]  # before, every 2 steps, after (the best restored)
    during = evals[1:-1]
    best = max(during, key=lambda e: e["accuracy"])
    assert metrics["eval"]["best_checkpoint"].endswith(f"checkpoint-{best['step']}")
    assert metrics["eval"]["accuracy_after"] == best["accuracy"]
    assert metrics["train"]["lr_scheduler"] == "constant" and metrics["train"]["warmup_ratio"] == 0.0
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(kept) <= 2 and f"checkpoint-{best['step']}" in kept  # the newest one and the best one


@pytest.mark.parametrize("flag", [["--packing"], ["--quantize", "int8"], ["--export-gguf", "q8_0"], ["--fsdp"],
                                  ["--eval-examples", "4"], ["--gradient-checkpointing"]])
def test_flags_of_the_sft_job_are_refused(flag, tmp_path, tiny_bert, tiny_data, capsys):
    out = tmp_path / "o"
    assert _train(tiny_bert, tiny_data, out, *flag) == 2
    assert_one_line_error(2, capsys.readouterr().err, "train", flag[0], "text classifier", f"leave out {flag[0]}")
    assert not out.exists()


def test_load_best_needs_eval_steps(tmp_path, tiny_bert, tiny_data, capsys):
    assert _train(tiny_bert, tiny_data, tmp_path / "o", "--load-best") == 2
    assert_one_line_error(2, capsys.readouterr().err, "train", "--load-best", "--eval-steps")
