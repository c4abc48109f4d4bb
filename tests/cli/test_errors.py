"""Bad input to the commands: one clear line on stderr naming the problem, exit status 2, no
traceback. Data errors are found before any model is loaded, so these run in milliseconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loracast.cli import main

ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.err


def assert_one_line_error(status: int, err: str, command: str, *fragments: str) -> None:
    assert status == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"loracast {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert "Traceback" not in err


TWO_LABELS = "text,label\nhello there,a\nhi again,a\nanother one,b\nand more,b\nlast one,b\n"

# (file name, content, fragments the message must contain)
DATA_CASES = {
    "missing": (None, None, ["does not exist"]),
    "not utf-8": ("bad.csv", b"text,label\n\xff\xfe\x00garbage,\x81\n", ["not UTF-8"]),
    "binary jsonl": ("bad.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00", ["not UTF-8"]),
    "invalid json": ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": oops}\n', ["line 2", "not valid JSON"]),
    "json not an object": ("list.jsonl", '["a", "b"]\n', ["line 1", "not an object"]),
    "csv wrong columns": ("cols.csv", "sentence,category\nhello,a\n", ["'text' and 'label'", "sentence"]),
    "jsonl missing label": ("nolabel.jsonl", '{"text": "hello"}\n', ["line 1", "missing: label"]),
    "empty text": ("empty.csv", "text,label\n,a\nhello,b\n", ["line 2", "empty"]),
    "one label": ("one.csv", "text,label\nhello,a\nhi,a\nhey,a\n", ["at least two labels"]),
    "bad split": ("split.jsonl", '{"text": "a", "label": "x", "split": "holdout"}\n', ["split", "'test'"]),
    "wrong extension": ("data.txt", "text,label\nhello,a\n", [".csv or .jsonl"]),
    "empty file": ("empty.jsonl", "", ["no examples"]),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_is_one_line_exit_2(case, tmp_path, capsys):
    name, content, fragments = DATA_CASES[case]
    path = tmp_path / "missing.csv" if name is None else write(tmp_path / name, content)
    status, err = run_cli(["train", "--model", str(tmp_path), "--data", str(path), "--out", str(tmp_path / "o")],
                          capsys)
    assert_one_line_error(status, err, "train", *fragments)


def test_unknown_label_names_line_and_expected_labels(tmp_path, capsys):
    data = write(tmp_path / "d.csv", TWO_LABELS + "stray row,c\n")
    status, err = run_cli(["train", "--model", str(tmp_path), "--data", str(data), "--labels", "a,b",
                           "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(status, err, "train", "unknown label 'c'", "line 7", "a, b")


def test_data_folder_without_data_files(tmp_path, tiny_llama, capsys):
    # a folder is a datasets folder (train.jsonl, test.jsonl, ...); an empty one says what it needs
    empty = tmp_path / "empty"
    empty.mkdir()
    status, err = run_cli(["train", "--model", str(tiny_llama), "--data", str(empty), "--out", str(tmp_path / "o")],
                          capsys)
    assert_one_line_error(status, err, "train", str(empty), "datasets cannot read it")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["missing", "file", "no config"])
def test_bad_model_folder(kind, tmp_path, capsys):
    data = write(tmp_path / "d.csv", TWO_LABELS)
    model = {"missing": tmp_path / "nope", "file": data, "no config": tmp_path}[kind]
    fragment = {"missing": "does not exist", "file": "is a file", "no config": "no config.json"}[kind]
    status, err = run_cli(["train", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(status, err, "train", fragment)


def test_out_is_a_file(tmp_path, capsys):
    out = write(tmp_path / "taken", "x")
    status, err = run_cli(["train", "--model", str(tmp_path), "--data", str(write(tmp_path / "d.csv", TWO_LABELS)),
                           "--out", str(out)], capsys)
    assert_one_line_error(status, err, "train", "is a file")


def test_compare_precision_refuses_fp32_base(tmp_path, capsys):
    data = write(tmp_path / "d.csv", TWO_LABELS)
    status, err = run_cli(["train", "--data", str(data), "--compare-precision", "--dtype", "fp32",
                           "--model", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(status, err, "train", "half-precision base", "--dtype bf16")


def test_a_half_set_distributed_launch_is_refused_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as if launched by torchrun, but RANK, MASTER_ADDR... are missing
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    status, err = run_cli(["train", "--model", str(tmp_path), "--data", str(write(tmp_path / "d.csv", TWO_LABELS)),
                           "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(status, err, "train", "WORLD_SIZE=2", "RANK", "torchrun --nproc_per_node 2")


def test_merge_bad_paths(tmp_path, trained_run, tiny_bert, capsys):
    adapter = trained_run / "adapter"
    status, err = run_cli(["merge", str(tmp_path / "nobase"), str(adapter), str(tmp_path / "m")], capsys)
    assert_one_line_error(status, err, "merge", "base model folder", "does not exist")
    status, err = run_cli(["merge", str(tiny_bert), str(tmp_path / "noadapter"), str(tmp_path / "m")], capsys)
    assert_one_line_error(status, err, "merge", "adapter_config.json")
    taken = write(tmp_path / "taken", "x")
    status, err = run_cli(["merge", str(tiny_bert), str(adapter), str(taken)], capsys)
    assert_one_line_error(status, err, "merge", "is a file")


def test_convert_bad_paths(tmp_path, trained_run, capsys):
    status, err = run_cli(["convert", str(tmp_path / "none"), str(tmp_path / "c"), "--dtype", "bf16"], capsys)
    assert_one_line_error(status, err, "convert", "does not exist")
    broken = tmp_path / "broken"
    broken.mkdir()
    write(broken / "adapter_config.json", json.dumps({"r": 8, "target_modules": ["q"]}))
    write(broken / "adapter_model.safetensors", b"not a safetensors file")
    status, err = run_cli(["convert", str(broken), str(tmp_path / "c"), "--dtype", "bf16"], capsys)
    assert_one_line_error(status, err, "convert", "cannot read", "safetensors")


def test_convert_refuses_pickle_adapters(tmp_path, capsys):
    folder = tmp_path / "legacy"
    folder.mkdir()
    write(folder / "adapter_config.json", json.dumps({"r": 8, "target_modules": ["q"]}))
    torch.save({"base_model.model.q.lora_A.weight": torch.zeros(2, 2)}, folder / "adapter_model.bin")
    status, err = run_cli(["convert", str(folder), str(tmp_path / "c"), "--dtype", "bf16"], capsys)
    assert_one_line_error(status, err, "convert", "pickle")


def test_bad_input_exits_2_without_traceback_in_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "loracast", "train", "--model", str(tmp_path), "--data",
                             str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={"PYTHONPATH": str(ROOT / "src"), "PATH": "", "HOME": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"loracast train: error: data {str(tmp_path / 'none.csv')!r} does not exist; pass a JSONL, JSON or Parquet "
        "file (or a datasets folder) of messages, prompt/completion or text rows, or a CSV/JSONL file with 'text' "
        "and 'label'"]
    assert result.stdout == ""
