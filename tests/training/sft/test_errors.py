"""Bad input to `loracast train` on instruction data: one line naming the file, the line or field
and the fix; exit status 2; no traceback; nothing written to OUT. All are found before any model
weights are loaded."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_errors import assert_one_line_error, run_cli, write
from tests.support.tiny_llm import save_tiny_llama, triage_rows, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

# (file content, fragments the message must contain)
CASES = {
    "invalid json": (json.dumps(GOOD) + '\n{"messages": [oops\n', ["line 2", "not valid JSON"]),
    "no assistant turn": (json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n",
                          ["line 1", "no assistant turn"]),
    "empty completion": (json.dumps(GOOD) + "\n" + json.dumps({"prompt": "hi", "completion": " "}) + "\n",
                         ["line 2", "empty 'completion'"]),
    "roles out of order": (json.dumps({"messages": [{"role": "assistant", "content": "a"},
                                                    {"role": "user", "content": "b"}]}) + "\n",
                           ["line 1", "roles in the order", "alternating"]),
    "both formats": (json.dumps({**GOOD, "prompt": "x", "completion": "y", "extra": 1}) + "\n",
                     ["line 1", "mixes formats"]),
    "bad role": (json.dumps({"messages": [{"role": "bot", "content": "a"}]}) + "\n", ["messages[0]", "'role'"]),
    "non utf-8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n', ["not UTF-8"]),
}



@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_chat_data_is_one_line_exit_2(case, tmp_path, tiny_llama, capsys):
    content, fragments = CASES[case]
    data = write(tmp_path / "chat.jsonl", content)
    out = tmp_path / "out"
    status, err = run_cli(["train", "--model", str(tiny_llama), "--data", str(data), "--out", str(out)], capsys)
    assert_one_line_error(status, err, "train", "chat.jsonl", *fragments)
    assert not out.exists()


def test_messages_for_a_model_without_chat_template(tmp_path, capsys):
    folder = save_tiny_llama(tmp_path / "no_template")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    data = write_jsonl(tmp_path / "chat.jsonl", triage_rows(4, 2))
    out = tmp_path / "out"
    capsys.readouterr()  # the model save's progress bar
    status, err = run_cli(["train", "--model", str(folder), "--data", str(data), "--out", str(out)], capsys)
    assert_one_line_error(status, err, "train", "no chat template", "'prompt'/'completion'", "--chat-template")
    assert not out.exists()


def test_every_example_too_long(tmp_path, tiny_llama, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", triage_rows(4, 2))
    status, err = run_cli(["train", "--model", str(tiny_llama), "--data", str(data), "--out", str(tmp_path / "o"),
                           "--max-length", "10"], capsys)
    assert_one_line_error(status, err, "train", "longer than --max-length 10", "raise --max-length")


def test_a_gguf_that_is_not_a_gguf(tmp_path, capsys):
    fake = write(tmp_path / "model.gguf", b"PK\x03\x04 not a gguf")
    data = write_jsonl(tmp_path / "chat.jsonl", triage_rows(4, 2))
    status, err = run_cli(["train", "--model", str(fake), "--data", str(data), "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(status, err, "train", "is not a GGUF file")


def test_chat_data_with_a_classifier_model(tmp_path, tiny_bert, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", triage_rows(4, 2))
    status, err = run_cli(["train", "--model", str(tiny_bert), "--data", str(data), "--out", str(tmp_path / "o")],
                          capsys)
    assert_one_line_error(status, err, "train", "BertModel", "not a causal language model", "'text'/'label'")


def test_text_label_data_with_a_gguf_model(tmp_path, tiny_data, capsys):
    fake = write(tmp_path / "model.gguf", b"GGUF")
    status, err = run_cli(["train", "--model", str(fake), "--data", str(tiny_data), "--out", str(tmp_path / "o")],
                          capsys)
    assert_one_line_error(status, err, "train", "text/label", "GGUF causal LM", "messages or prompt/completion")
