"""`loracast merge` and `loracast convert` on the adapter of a short tiny-model run.

merge: the written folder loads with transformers alone and gives the unmerged model's outputs
(oracle: the loracast PeftModel with the adapter unmerged; tolerances per dtype below).
convert: the reported errors equal those recomputed from the two files; fp16 overflow is refused.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loracast import PeftModel, PrecisionWarning
from loracast.cli import main

# Merged weights are rounded once to the target dtype; outputs then differ from the unmerged model
# (adapter branch computed separately) by rounding only.
MERGE_ATOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


def _probe(tiny_bert: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    return dict(tokenizer(["the parcel was returned to you by mistake", "please delete my account"],
                          padding=True, return_tensors="pt"))


@pytest.mark.parametrize("dtype_name,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_merge_writes_a_transformers_model_equal_to_the_unmerged_one(dtype_name, dtype, tmp_path, trained_run,
                                                                    tiny_bert, capsys):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "merged"
    assert main(["merge", str(tiny_bert), str(trained_run / "adapter"), str(out), "--dtype", dtype_name]) == 0
    printed = capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()

    merged = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()  # transformers alone
    assert merged.config.id2label == {0: "account", 1: "billing", 2: "delivery", 3: "technical"}
    assert {p.dtype for p in merged.parameters()} == {dtype}
    assert not any("lora" in name for name, _ in merged.named_parameters())

    torch.manual_seed(7)  # any head init: the adapter's trained head replaces it
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=4, dtype=dtype)
    # the fingerprint notices the adapter was trained on a float32 base; merge prints the same as a note
    expect_note = dtype != torch.float32
    with pytest.warns(PrecisionWarning, match="float32 at save") if expect_note else contextlib.nullcontext():
        unmerged = PeftModel.from_pretrained(base, trained_run / "adapter").eval()
    assert ("note: adapter 'default'" in printed) == expect_note
    inputs = _probe(tiny_bert)
    with torch.no_grad():
        expected = unmerged(**inputs).logits.float()
        got = merged(**inputs).logits.float()
    torch.testing.assert_close(got, expected, rtol=0, atol=MERGE_ATOL[dtype])

    match = re.search(r"max abs diff (\S+), mean abs diff (\S+)", printed)
    assert match, printed
    max_diff, mean_diff = float(match.group(1)), float(match.group(2).rstrip(","))
    assert 0 <= mean_diff <= max_diff <= MERGE_ATOL[dtype]


def test_convert_reports_the_rounding_it_did(tmp_path, trained_run, capsys):
    source = trained_run / "adapter"
    out = tmp_path / "bf16"
    assert main(["convert", str(source), str(out), "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    before = load_file(str(source / "adapter_model.safetensors"))
    after = load_file(str(out / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and {t.dtype for t in after.values()} == {torch.bfloat16}
    # oracle: the errors recomputed here from the two files
    max_abs = max(float((after[k].double() - before[k].double()).abs().max()) for k in before)
    err = sum(float(((after[k].double() - before[k].double()) ** 2).sum()) for k in before) ** 0.5
    ref = sum(float((before[k].double() ** 2).sum()) for k in before) ** 0.5
    match = re.search(r"max abs (\S+), relative \(\|\|delta\|\| / \|\|x\|\|\) (\S+),", printed)
    assert match, printed
    assert float(match.group(1)) == pytest.approx(max_abs, rel=1e-2)
    assert float(match.group(2)) == pytest.approx(err / ref, rel=1e-2)
    assert 0 < err / ref < 2 ** -8  # bf16 keeps 8 significant bits
    size = re.search(r"size: ([\d,]+) -> ([\d,]+) bytes", printed)
    old, new = (int(g.replace(",", "")) for g in size.groups())
    assert old == (source / "adapter_model.safetensors").stat().st_size
    assert new == (out / "adapter_model.safetensors").stat().st_size
    values = sum(t.numel() for t in before.values())
    assert abs((old - new) - 2 * values) < 256  # 2 bytes less per value; the JSON header changes a little
    assert (out / "adapter_config.json").read_text() == (source / "adapter_config.json").read_text()
    assert json.loads((out / "labels.json").read_text())["labels"][0] == "account"


def test_converted_adapter_loads_with_the_rule_dtype(tmp_path, trained_run, tiny_bert):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "bf16"
    assert main(["convert", str(trained_run / "adapter"), str(out), "--dtype", "bf16"]) == 0
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=4)
    model = PeftModel.from_pretrained(base, out)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}


def _adapter_with(tmp_path: Path, trained_run: Path, key_value: float, flushed: int = 0) -> Path:
    folder = tmp_path / "crafted"
    shutil.copytree(trained_run / "adapter", folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = key_value
    if flushed:
        tensors[key][1, :flushed] = 1e-9  # below fp16's smallest subnormal (6e-8)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def test_convert_refuses_fp16_overflow(tmp_path, trained_run, capsys):
    folder = _adapter_with(tmp_path, trained_run, 70000.0)
    out = tmp_path / "fp16"
    assert main(["convert", str(folder), str(out), "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loracast convert: error: 1 tensor(s) hold values beyond float16's largest finite value "
                          "65504")
    assert "lora_B.weight (max |x| 7e+04)" in err and "bf16" in err
    assert not out.exists()  # nothing written
    assert main(["convert", str(folder), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0  # bf16 has the range


def test_convert_counts_values_flushed_to_zero(tmp_path, trained_run, capsys):
    folder = _adapter_with(tmp_path, trained_run, 1.0, flushed=5)
    assert main(["convert", str(folder), str(tmp_path / "fp16"), "--dtype", "fp16"]) == 0
    assert "5 non-zero values flushed to zero" in capsys.readouterr().out
