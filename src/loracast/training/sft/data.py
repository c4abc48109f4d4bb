"""Instruction data for supervised fine-tuning, in the formats TRL's SFT trainer reads.

Files: JSON lines (``.jsonl``), a JSON array of rows (``.json``), Parquet (``.parquet``), or a
folder that Hugging Face ``datasets`` reads (``train.jsonl``/``test.parquet``, ...: each file's
name is its split). Each row in one of these formats (a file may mix them, a row may not):

- conversational: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``,
  an optional system turn first, then user and assistant turns alternating, ending with an
  assistant turn. Every assistant turn is trained on;
- prompt/completion: ``{"prompt": "...", "completion": "..."}`` (plain text: the model sees the
  prompt and learns the completion, no chat template), or both as message lists (conversational:
  the chat template applies);
- language modelling: ``{"text": "..."}``, trained on every token, no chat template.

An optional ``split`` field ("train" / "test") fixes the held-out set; without it a seeded
fraction is held out. Other fields are ignored.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from loracast.training.common.data import EVAL_SPLITS, TRAIN_SPLITS, parse_json_object, require_every_split
from loracast.training.common.errors import DataError

DEFAULT_CHAT_DATA = "support_triage.jsonl"
ROLES = ("system", "user", "assistant")
CLASSIFIER_KEYS = frozenset({"text", "label"})
CHAT_KEYS = frozenset({"messages", "prompt", "completion"})
DATASETS_SUFFIXES = (".parquet",)  # read through Hugging Face datasets, as folders are


@dataclass(frozen=True)
class ChatExample:
    """One training conversation.

    `messages` holds the whole conversation for conversational rows; for plain prompt/completion
    rows it is ``[user: prompt, assistant: completion]`` with `plain` set (no chat template).
    """

    messages: tuple[dict[str, str], ...]
    plain: bool
    split: str | None
    line: int

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation up to its last assistant turn: what a model is asked at evaluation."""
        return list(self.messages[:-1])

    @property
    def has_prompt(self) -> bool:
        """False for a language-modelling ``text`` row: there is nothing to ask, only text to learn."""
        return not (self.plain and not self.messages[0]["content"])

    @property
    def reference(self) -> str:
        """The last assistant turn: the answer evaluation expects."""
        return self.messages[-1]["content"]


def default_chat_data_path() -> Path:
    """The support-triage dataset shipped with loracast (CC0-1.0, see data/README.md)."""
    return Path(str(resources.files("loracast") / "data" / DEFAULT_CHAT_DATA))


def data_kind(path: str | Path) -> str:
    """'chat' (messages or prompt/completion rows), 'text' (text rows alone: language modelling, or
    classification data without its labels; the model decides) or 'classification' (text/label
    rows) from the first row of a file; CSV files are classification data.

    Raises:
        DataError: the file is missing or its first row is neither kind.
    """
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in DATASETS_SUFFIXES:
        return "chat" if path.exists() else _missing(path)
    if not path.is_file():
        _missing(path)
    if path.suffix.lower() == ".json" and _is_json_array(path):
        return "chat"
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        return "classification"  # CSV, or an extension the classification reader explains
    try:
        with open(path, encoding="utf-8") as handle:
            first = next(((n, raw) for n, raw in enumerate(handle, start=1) if raw.strip()), None)
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "save it as UTF-8") from exc
    if first is None:
        raise DataError(f"data file {str(path)!r} holds no examples")
    number, raw = first
    record = _parse_line(raw, path, number)
    keys = set(record)
    if keys & CHAT_KEYS:
        return "chat"
    if keys - {"split"} == {"text"}:
        return "text"
    if keys & CLASSIFIER_KEYS:
        return "classification"  # its reader names a missing 'text' or 'label'
    raise DataError(f"{path}: line {number} has fields {sorted(keys)}; expected 'messages', 'prompt' and "
                    "'completion' (instruction data) or 'text' and 'label' (classification data)")


def _missing(path: Path) -> str:
    raise DataError(f"data {str(path)!r} does not exist; pass a JSONL, JSON or Parquet file (or a datasets folder) "
                    "of messages, prompt/completion or text rows, or a CSV/JSONL file with 'text' and 'label'")


def _is_json_array(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            head = handle.read(4096).lstrip()
    except (OSError, UnicodeDecodeError):
        return False
    return head.startswith("[")


def _parse_line(raw: str, path: Path, number: int) -> dict[str, Any]:
    return parse_json_object(raw, path, number, '{"messages": [...]} or {"prompt": "...", "completion": "..."}')


def read_chat_examples(path: str | Path) -> list[ChatExample]:
    """Every example of a JSONL instruction-data file.

    Raises:
        DataError: the file is missing, not UTF-8, or a line is not valid JSON, mixes formats, has
            roles out of order, no assistant turn, or an empty completion (named with its line).
    """
    path = Path(path)
    data_kind(path)  # existence, encoding and the first row's kind
    if path.is_dir() or path.suffix.lower() in DATASETS_SUFFIXES:
        return [_example(record, path, number) for number, record in _dataset_records(path)]
    if path.suffix.lower() == ".json" and _is_json_array(path):
        return [_example(record, path, number) for number, record in _json_array_records(path)]
    rows = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    rows.append(_example(_parse_line(raw, path, number), path, number))
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "save it as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"cannot read data file {str(path)!r}: {exc.strerror or exc}") from exc
    return rows


def _json_array_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a valid JSON array of rows ({exc}); write one object per row") from exc
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path} must hold a JSON array of objects (rows), or one JSON object per line")
    return list(enumerate(rows, start=1))


def _dataset_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The rows of a Parquet file or a datasets folder, each split's rows marked with its split
    (a file named train.* or test.* in a folder), numbered from 1 across splits."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{path}: reading Parquet files and dataset folders needs the datasets package: "
                        "pip install datasets") from exc
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a local folder never needs the Hub
    bars_were_off = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()  # the run's own output stays readable; restored below
    try:
        if path.is_dir():
            loaded = datasets.load_dataset(str(path))
        else:
            loaded = datasets.load_dataset("parquet", data_files={"train": str(path)})
    except Exception as exc:  # datasets raises many types for unreadable data; each becomes one line here
        raise DataError(f"{path}: datasets cannot read it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                        "pass a folder of train/test JSONL, JSON, CSV or Parquet files, or one file") from exc
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    splits = list(loaded)
    if path.is_dir() and "train" not in splits:
        raise DataError(f"{path}: the dataset has splits {splits} and no 'train' split; name the training file "
                        "train.jsonl (or train.parquet, ...) and the held-out one test.*")
    records = []
    for split in splits:
        for row in loaded[split]:
            record = dict(row)
            if path.is_dir():
                record["split"] = split
            records.append((len(records) + 1, record))
    return records


def _example(record: dict[str, Any], path: Path, line: int) -> ChatExample:
    where = f"{path}: line {line}"
    keys = set(record)
    if "messages" in keys and keys & {"prompt", "completion"}:
        raise DataError(f"{where} mixes formats (fields {sorted(keys)}); give either 'messages' or 'prompt' and "
                        "'completion', not both")
    if keys & CLASSIFIER_KEYS and keys & CHAT_KEYS:
        raise DataError(f"{where} mixes classification fields ('text'/'label') with instruction fields "
                        f"({sorted(keys & CHAT_KEYS)}); keep one format per file")
    split = _split(record.get("split"), where)
    if keys - {"split"} == {"text"}:  # language modelling: every token is learnt
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where} has an empty or non-text 'text'; every row needs text to learn")
        return ChatExample(({"role": "user", "content": ""}, {"role": "assistant", "content": text}), True, split,
                           line)
    if "messages" in keys:
        messages = _messages(record["messages"], where, "messages")
        _check_order(messages, where)
        return ChatExample(tuple(messages), False, split, line)
    if {"prompt", "completion"} <= keys:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion.strip():
                raise DataError(f"{where} has an empty 'completion'; every example needs an answer to learn")
            return ChatExample(({"role": "user", "content": prompt}, {"role": "assistant", "content": completion}),
                               True, split, line)
        messages = _messages(prompt, where, "prompt") + _messages(completion, where, "completion")
        _check_order(messages, where)
        return ChatExample(tuple(messages), False, split, line)
    raise DataError(f"{where} has fields {sorted(keys)}; expected 'messages', or 'prompt' and 'completion'")


def _split(value: Any, where: str) -> str | None:
    if value is None or not str(value).strip():
        return None
    name = str(value).strip().lower()
    if name not in TRAIN_SPLITS | EVAL_SPLITS:
        raise DataError(f"{where} has split {value!r}; use 'train' or 'test' (or leave it out)")
    return "train" if name in TRAIN_SPLITS else "test"


def _messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{field}' must be a non-empty list of {{'role': ..., 'content': ...}} objects "
                        "(or, for prompt/completion, two strings)")
    out = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"),
                                                                                                 str):
            raise DataError(f"{where}: {field}[{index}] is {json.dumps(message)[:80]}; each message needs a 'role' "
                            "(system, user or assistant) and a text 'content'")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _check_order(messages: list[dict[str, str]], where: str) -> None:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise DataError(f"{where} has no assistant turn (roles {roles}); add the answer the model should learn")
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(body))]
    if body != expected or roles[-1] != "assistant":
        raise DataError(f"{where} has roles in the order {roles}; expected an optional system turn, then user and "
                        "assistant turns alternating, ending with an assistant turn")
    if not messages[-1]["content"].strip():
        raise DataError(f"{where} has an empty last assistant turn; every example needs an answer to learn")


def split_chat_examples(examples: Sequence[ChatExample], source: str, eval_fraction: float = 0.2, seed: int = 0
                        ) -> tuple[list[ChatExample], list[ChatExample]]:
    """(train, held-out): by the rows' ``split`` field when present, else a seeded random fraction.

    Raises:
        DataError: some rows have a split and others not, one side is empty, or too few rows.
    """
    with_split = [e for e in examples if e.split is not None]
    if with_split:
        require_every_split(examples, source)
        train = [e for e in examples if e.split == "train"]
        held = [e for e in examples if e.split == "test"]
    else:
        if not 0.0 < eval_fraction < 1.0:
            raise DataError(f"eval fraction {eval_fraction} must be between 0 and 1")
        order = list(examples)
        random.Random(seed).shuffle(order)
        count = max(1, round(len(order) * eval_fraction)) if len(order) > 1 else 0
        held, train = order[:count], order[count:]
    if not train or not held:
        raise DataError(f"{source}: {len(train)} train and {len(held)} held-out examples; both are needed (add rows, "
                        "or give rows a 'split' of 'train' and 'test')")
    return train, held
