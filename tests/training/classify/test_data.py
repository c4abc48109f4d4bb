"""Data files, label sets and splits; the classifier's seeded batch order."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from loracast.training.classify.data import DataError, default_data_path, label_order, read_examples, split_examples
from loracast.training.classify.engine import ShuffledBatches


def test_shipped_dataset_is_balanced_and_split_by_core_request():
    examples = read_examples(default_data_path())
    assert len(examples) == 1200
    counts = Counter((e.label, e.split) for e in examples)
    assert set(counts.values()) == {240, 60} and len(counts) == 8
    train, held = split_examples(examples, "shipped")
    assert (len(train), len(held)) == (960, 240)
    assert train.label_names == ["account", "billing", "delivery", "technical"]
    assert not set(train.texts) & set(held.texts)


def test_csv_and_jsonl_read_the_same_rows(tmp_path):
    rows = [("a b", "x"), ("c, d", "y"), ('say "hi"', "x")]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("label,text\n" + "".join(f'{l},"{t.replace(chr(34), chr(34) * 2)}"\n' for t, l in rows))
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
    from_csv = [(e.text, e.label) for e in read_examples(csv_path)]
    from_jsonl = [(e.text, e.label) for e in read_examples(jsonl_path)]
    assert from_csv == from_jsonl == rows


def test_stratified_split_holds_out_the_fraction_of_each_label_and_is_seeded(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3}) + "\n" for i in range(60)))
    examples = read_examples(path)
    train, held = split_examples(examples, "d", eval_fraction=0.25, seed=1)
    assert train.label_names == ["0", "1", "2"]  # integer labels keep numeric order
    assert Counter(held.labels) == {0: 5, 1: 5, 2: 5} and len(train) == 45
    again, _ = split_examples(examples, "d", eval_fraction=0.25, seed=1)
    other, _ = split_examples(examples, "d", eval_fraction=0.25, seed=2)
    assert again.texts == train.texts and other.texts != train.texts


def test_label_names_fix_the_order_and_the_set(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{'pos' if i % 2 else 'neg'}\n" for i in range(10)))
    train, _held = split_examples(read_examples(path), "d", label_names=["pos", "neg"])
    assert train.label_names == ["pos", "neg"] and all(
        (label == 0) == (int(text[1:]) % 2 == 1) for text, label in zip(train.texts, train.labels))
    with pytest.raises(DataError, match="unknown label 'neg'"):
        split_examples(read_examples(path), "d", label_names=["pos", "other"])


def test_partial_split_column_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x", "split": "train"}\n{"text": "b", "label": "y"}\n')
    with pytest.raises(DataError, match="line 2 has no split"):
        split_examples(read_examples(path), str(path))


def test_label_order():
    assert label_order(["10", "9", "1"]) == ["1", "9", "10"]
    assert label_order(["b", "a", "1"]) == ["1", "a", "b"]


def test_shuffled_batches_cover_every_row_once_per_epoch_and_replay_by_epoch():
    sampler = ShuffledBatches(10, 4, seed=3)
    first = list(sampler)
    assert [len(b) for b in first] == [4, 4, 2] and len(sampler) == 3
    assert sorted(i for b in first for i in b) == list(range(10))
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(i for b in second for i in b) == list(range(10)) and second != first
    # one generator across epochs, as a loop that draws a permutation per epoch: a resumed epoch is the same
    generator = torch.Generator().manual_seed(3)
    orders = [torch.randperm(10, generator=generator).tolist() for _ in range(2)]
    assert [i for b in first for i in b] == orders[0] and [i for b in second for i in b] == orders[1]
    assert list(ShuffledBatches(10, 4, seed=3)) == first
