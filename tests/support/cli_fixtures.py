"""Fixtures for the command-line, training and export tests (tiny BERT folder, tiny data, one trained run,
a tiny Llama and its GGUF, chat data), loaded for every test folder by tests/conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.tiny_bert import TRAIN_FAST, rows_per_label, save_tiny_bert
from tests.support.tiny_gguf import GGUF_NAME, write_gguf
from tests.support.tiny_llm import save_tiny_llama, triage_rows, write_jsonl


@pytest.fixture(scope="session")
def tiny_rows() -> list[dict]:
    """About 100 labelled rows (4 labels, with a train/test split column)."""
    return rows_per_label(20)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_rows) -> Path:
    """`tiny_rows` as a JSONL file."""
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in tiny_rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, tiny_rows) -> Path:
    """Folder of a tiny random BertModel (no head) with its tokenizer, like the MiniLM package's."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), [r["text"] for r in tiny_rows])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_bert, tiny_data) -> Path:
    """The output folder of one short `loracast train` run on the tiny model (shared by tests)."""
    from loracast.cli import main

    out = tmp_path_factory.mktemp("run") / "out"
    status = main(["train", "--model", str(tiny_bert), "--data", str(tiny_data), "--out", str(out), *TRAIN_FAST])
    assert status == 0
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Folder of a tiny random LlamaForCausalLM with a BPE tokenizer and a ChatML chat template."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_llama) -> Path:
    """`tiny_llama` (weights, tokenizer, chat template) converted to one F32 GGUF file, as llama.cpp writes it."""
    return write_gguf(tiny_llama, tmp_path_factory.mktemp("tiny_gguf") / GGUF_NAME)


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    """16 train and 4 test conversations of the shipped triage data, as JSONL."""
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", triage_rows(16, 4))
