"""`loracast convert --allow-pickle`: a PEFT adapter saved as ``adapter_model.bin`` becomes safetensors.

Oracle: PEFT 0.21.2 itself: the same adapter saved by PEFT as safetensors (same tensors, same
file size) and PEFT loading the converted folder (equal outputs, tolerance 0).
"""

from __future__ import annotations

import os

import peft
import torch
from safetensors.torch import load_file

import loracast
from loracast.cli import main
from tests.cli.test_errors import assert_one_line_error, run_cli
from tests.support.models import mixed_net, randomize_adapters

TARGETS = ["lin", "conv1d", "conv2d"]
IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def peft_adapter():
    model = peft.get_peft_model(mixed_net(), peft.LoraConfig(r=4, target_modules=TARGETS))
    randomize_adapters(model)
    return model.eval()


def test_pickle_adapter_is_refused_with_the_flag_named(tmp_path, capsys):
    peft_adapter().save_pretrained(str(tmp_path / "legacy"), safe_serialization=False)
    status, err = run_cli(["convert", str(tmp_path / "legacy"), str(tmp_path / "out")], capsys)
    assert_one_line_error(status, err, "convert", "nothing to do", "--allow-pickle")
    status, err = run_cli(["convert", str(tmp_path / "legacy"), str(tmp_path / "out"), "--dtype", "bf16"], capsys)
    assert_one_line_error(status, err, "convert", "adapter_model.bin is a pickle file",
                          f"loracast convert {tmp_path / 'legacy'} OUT --allow-pickle")
    assert not (tmp_path / "out").exists()


def test_allow_pickle_writes_the_safetensors_peft_would_write(tmp_path, capsys):
    theirs = peft_adapter()
    theirs.save_pretrained(str(tmp_path / "legacy"), safe_serialization=False)
    theirs.save_pretrained(str(tmp_path / "peft-safe"))
    assert main(["convert", str(tmp_path / "legacy"), str(tmp_path / "out"), "--allow-pickle"]) == 0
    captured = capsys.readouterr()
    assert "warning: read the pickle file" in captured.err and "weights_only=True" in captured.err
    assert "safetensors, dtypes kept" in captured.out
    assert set(os.listdir(tmp_path / "out")) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}

    converted = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    reference = load_file(str(tmp_path / "peft-safe" / "adapter_model.safetensors"))
    assert converted.keys() == reference.keys() and all(torch.equal(converted[k], reference[k]) for k in reference)
    assert os.path.getsize(tmp_path / "out" / "adapter_model.safetensors") == \
        os.path.getsize(tmp_path / "peft-safe" / "adapter_model.safetensors")

    with torch.no_grad():
        expected = theirs(IDS)
        reloaded = peft.PeftModel.from_pretrained(mixed_net(), str(tmp_path / "out")).eval()
        assert torch.equal(reloaded(IDS), expected)
        ours = loracast.PeftModel.from_pretrained(mixed_net(), tmp_path / "out").eval()
        assert torch.equal(ours(IDS), expected)

    # a dtype change reads the pickle file the same way
    assert main(["convert", str(tmp_path / "legacy"), str(tmp_path / "bf16"), "--allow-pickle", "--dtype", "bf16"]) == 0
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "adapter_model.safetensors")).values()} == \
        {torch.bfloat16}
