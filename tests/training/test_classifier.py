"""`loracast train` on a tiny random BERT: the files it writes, what they hold, and that the
saved adapter is the trained one (loracast and PEFT both load it to the same outputs)."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loracast import PeftModel
from loracast.cli import main
from tests.support.tiny_bert import TRAIN_FAST

ROOT = Path(__file__).resolve().parents[2]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_train_writes_adapter_metrics_and_plot(trained_run):
    adapter = trained_run / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "labels.json"]
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["labels"] == ["account", "billing", "delivery", "technical"]
    assert metrics["policy"] == "stable" and metrics["base_dtype"] == "float32"
    assert metrics["adapter_dtypes"] == {"float32": 2 * 2 * (32 * 8 + 8 * 32)}  # 2 layers x query,value x A,B
    assert metrics["lora"]["modules_to_save"] == ["classifier", "score"]
    steps = metrics["history"]["steps"]
    assert len(steps) == metrics["train"]["steps"] == 3 * 5  # 80 train rows / 16 per step, 3 epochs
    assert all(s["loss"] > 0 for s in steps)
    evals = metrics["history"]["evals"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 15
    assert metrics["eval"]["accuracy_before"] == evals[0]["accuracy"]
    assert metrics["eval"]["accuracy_after"] == evals[-1]["accuracy"]
    summary = metrics["precision_summary"]
    assert summary["trainable_params"] == 2048 + 4 * 32 + 4  # adapters + classifier copy
    # AdamW: exp_avg and exp_avg_sq in fp32 per value, plus a 4-byte step counter per tensor (8 LoRA + 2 head)
    assert summary["optimizer_state_bytes"] == 2 * 4 * summary["trainable_params"] + 4 * 10
    assert summary["peak_memory"]["bytes"] > 0 and summary["seconds_per_step"]["median"] > 0
    umask = os.umask(0)
    os.umask(umask)
    for written in (adapter / "adapter_model.safetensors", adapter / "adapter_config.json", trained_run / "metrics.json"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask  # as any new file, not private 0600
    width, height = png_size(trained_run / "training_curve.png")
    assert (width, height) == (1100, 440)


def test_saved_adapter_is_the_trained_one_and_peft_loads_it(trained_run, tiny_bert):
    from peft import PeftModel as PeftPeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    def base():
        torch.manual_seed(123)  # a different head init: the adapter must bring the trained head
        return AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=4).eval()

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    inputs = tokenizer(["my parcel has not arrived", "i was charged twice"], padding=True, return_tensors="pt")
    ours = PeftModel.from_pretrained(base(), trained_run / "adapter").eval()
    theirs = PeftPeftModel.from_pretrained(base(), str(trained_run / "adapter")).eval()
    with torch.no_grad():
        plain = base()(**inputs).logits
        a, b = ours(**inputs).logits, theirs(**inputs).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # oracle: PEFT reading the same files
    assert not torch.allclose(a, plain)  # the adapter (trained head included) changes the outputs
    lora_b = [p for n, p in ours.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it was trained


def test_compare_precision_trains_both_policies(tmp_path, tiny_bert, tiny_data, capsys):
    out = tmp_path / "cmp"
    status = main(["train", "--model", str(tiny_bert), "--data", str(tiny_data), "--out", str(out),
                   "--compare-precision", "--epochs", "1", *TRAIN_FAST[2:]])
    assert status == 0
    runs = json.loads((out / "metrics.json").read_text())["runs"]
    assert set(runs) == {"stable", "fast"}
    assert runs["stable"]["base_dtype"] == runs["fast"]["base_dtype"] == "bfloat16"
    assert list(runs["stable"]["adapter_dtypes"]) == ["float32"]
    assert list(runs["fast"]["adapter_dtypes"]) == ["bfloat16"]
    # the same run twice: same data, same head initialisation, so the same accuracy before training
    assert runs["stable"]["eval"]["accuracy_before"] == runs["fast"]["eval"]["accuracy_before"]
    for policy in ("stable", "fast"):
        assert (out / policy / "adapter" / "adapter_model.safetensors").is_file()
    png_size(out / "compare_precision.png")
    table = capsys.readouterr().out
    assert "eval accuracy after" in table and "stable" in table and "fast" in table


def test_fast_policy_on_bf16_base(tmp_path, tiny_bert, tiny_data):
    out = tmp_path / "fast"
    assert main(["train", "--model", str(tiny_bert), "--data", str(tiny_data), "--out", str(out), "--dtype", "bf16",
                 "--precision", "fast", "--epochs", "1", *TRAIN_FAST[2:]]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    table = metrics["precision_summary"]["parameters"]
    assert table["base"]["dtypes"] == {"bfloat16": table["base"]["params"]}
    assert list(table["adapters"]["dtypes"]) == ["bfloat16"]
    assert list(table["modules_to_save"]["dtypes"]) == ["bfloat16"]


@pytest.mark.parametrize("command", ["train", "merge", "convert"])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: loracast {command}" in text and "examples:" in text


def test_python_dash_m_runs_train_help():
    result = subprocess.run([sys.executable, "-m", "loracast", "train", "--help"], capture_output=True, text=True,
                            cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""}, timeout=120)
    assert result.returncode == 0 and "--compare-precision" in result.stdout


def test_console_script_is_the_cli_main():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attribute = scripts["loracast"].partition(":")
    assert getattr(__import__(module, fromlist=[attribute]), attribute) is main


def test_train_on_a_4bit_base(tmp_path, tiny_bert, tiny_data):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q4"
    assert main(["train", "--model", str(tiny_bert), "--data", str(tiny_data), "--out", str(out), "--load-in-4bit",
                 "--epochs", "1", *TRAIN_FAST[2:]]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["base_dtype"] == "4-bit nf4 (compute bfloat16)"
    assert "uint8" in metrics["precision_summary"]["parameters"]["base"]["dtypes"]  # packed 4-bit weights
    assert list(metrics["adapter_dtypes"]) == ["float32"]  # stable policy: fp32 adapters over the 4-bit base
    assert all(e["loss"] > 0 for e in metrics["history"]["evals"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
