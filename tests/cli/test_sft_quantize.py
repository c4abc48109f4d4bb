"""`loracast train --quantize`: which library quantizes the base, and what metrics.json records.

nf4 is bitsandbytes (as --load-in-4bit), int8 and int4 are torchao; nf4 without bitsandbytes is a
one-line refusal that names torchao's int4 instead. Oracle: the recorded choice, and for nf4 the
base description metrics.json reads from the trained model's layers.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from loracast.cli import main

from .test_errors import assert_one_line_error, run_cli

FAST = ["--batch-size", "4", "--lr", "5e-3", "--max-new-tokens", "4", "--eval-examples", "4", "--device", "cpu",
        "--max-steps", "2"]


@pytest.mark.parametrize(("quantize", "library"), [("nf4", "bitsandbytes"), ("int4", "torchao")])
def test_quantize_picks_the_library_and_metrics_record_it(quantize, library, tmp_path, tiny_llama, chat_data):
    pytest.importorskip(library)
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_llama), "--data", str(chat_data), "--out", str(out), *FAST,
                 "--quantize", quantize]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quantization"] == {"backend": library, "kind": quantize}
    # read from the layers: 4-bit for bitsandbytes; torchao keeps the float dtype its weights report
    assert metrics["base_dtype"] == ("4-bit nf4 (compute bfloat16)" if quantize == "nf4" else "bfloat16")


def test_nf4_leaves_the_output_head_float(tiny_llama):
    bnb = pytest.importorskip("bitsandbytes")
    from loracast.training.sft.model import load_llm

    model = load_llm(tiny_llama, torch.bfloat16, True, torch.device("cpu"), "eager")
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # as transformers' and the torchao path's default


def test_nf4_without_bitsandbytes_is_refused_naming_torchao(tmp_path, tiny_llama, chat_data, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: importing it fails
    out = tmp_path / "out"
    status, err = run_cli(["train", "--model", str(tiny_llama), "--data", str(chat_data), "--out", str(out), *FAST,
                           "--quantize", "nf4"], capsys)
    assert_one_line_error(status, err, "train", "--quantize nf4 needs bitsandbytes", "--quantize int4",
                          "torchao")
    assert not out.exists()


def test_load_in_4bit_with_a_torchao_kind_is_refused(tmp_path, tiny_llama, chat_data, capsys):
    out = tmp_path / "out"
    status, err = run_cli(["train", "--model", str(tiny_llama), "--data", str(chat_data), "--out", str(out), *FAST,
                           "--load-in-4bit", "--quantize", "int8"], capsys)
    assert_one_line_error(status, err, "train", "--load-in-4bit is --quantize nf4", "--quantize int8")
    assert not out.exists()
