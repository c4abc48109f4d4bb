"""Instruction data beyond JSON lines (training/sft/data.py): a JSON array, Parquet, a datasets
folder whose file names are its splits, and TRL's language-modelling ``text`` rows; and the
refusal of a folder without a train split."""

from __future__ import annotations

import json

import pytest

from loracast.cli import main
from loracast.training.sft.data import data_kind, read_chat_examples
from tests.support.tiny_llm import triage_rows, write_jsonl


@pytest.fixture(scope="module")
def rows():
    return triage_rows(8, 2)


def _same_examples(a, b):
    assert [(e.messages, e.plain, e.split) for e in a] == [(e.messages, e.plain, e.split) for e in b]


def test_json_array_and_parquet_read_as_json_lines(tmp_path, rows):
    import datasets

    lines = read_chat_examples(write_jsonl(tmp_path / "rows.jsonl", rows))
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(rows), encoding="utf-8")
    _same_examples(read_chat_examples(array), lines)
    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    assert data_kind(parquet) == "chat"
    _same_examples(read_chat_examples(parquet), lines)


def test_a_datasets_folder_takes_its_splits_from_the_file_names(tmp_path, rows):
    folder = tmp_path / "data"
    folder.mkdir()
    train = [{k: v for k, v in r.items() if k != "split"} for r in rows if r["split"] == "train"]
    test = [{k: v for k, v in r.items() if k != "split"} for r in rows if r["split"] == "test"]
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "test.jsonl", test)
    examples = read_chat_examples(folder)
    assert [e.split for e in examples] == ["train"] * len(train) + ["test"] * len(test)
    assert [e.reference for e in examples] == [r["messages"][-1]["content"] for r in train + test]


def test_text_rows_learn_every_token(tmp_path):
    from loracast.training.sft.template import encode_example
    from tests.support.tiny_llm import build_tokenizer

    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "order 123456 arrived broken"}, {"text": "ship it"}])
    assert data_kind(path) == "text"  # language modelling for a causal LM (`train sft`, or an LLM as --model)
    examples = read_chat_examples(path)
    assert all(e.plain for e in examples)
    encoded = encode_example(build_tokenizer(), examples[0])
    learnt = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != -100]
    assert learnt and learnt == [t for t in encoded.input_ids if t != build_tokenizer().bos_token_id]


def test_text_rows_train_a_causal_lm(tmp_path, tiny_llama):
    rows = [{"text": r["messages"][-1]["content"], "split": r["split"]} for r in triage_rows(8, 2)]
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_llama), "--data", str(write_jsonl(tmp_path / "t.jsonl", rows)),
                 "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "sft" and metrics["train"]["examples"] == 8


def test_a_folder_without_a_train_split_is_one_line_exit_2(tmp_path, rows, tiny_llama, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "validation.jsonl", rows)
    assert main(["train", "--model", str(tiny_llama), "--data", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no 'train' split" in err and str(folder) in err
    assert not (tmp_path / "out").exists()


def test_train_from_a_datasets_folder(tmp_path, rows, tiny_llama):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [r for r in rows if r["split"] == "train"])
    write_jsonl(folder / "test.jsonl", [r for r in rows if r["split"] == "test"])
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_llama), "--data", str(folder), "--out", str(out), "--max-steps", "2",
                 "--batch-size", "4", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["examples"] == 8 and metrics["eval"]["examples"] == 2
