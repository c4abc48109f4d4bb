"""Instruction data for supervised fine-tuning: JSONL in the formats TRL's SFT trainer reads.

One example per line, in either format (a file may mix them, a row may not):

- conversational: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``,
  an optional system turn first, then user and assistant turns alternating, ending with an
  assistant turn. Every assistant turn is trained on;
- prompt/completion: ``{"prompt": "...", "completion": "..."}`` (plain text: the model sees the
  prompt and learns the completion, no chat template), or both as message lists (conversational:
  the chat template applies).

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

from loracast.training.data import EVAL_SPLITS, TRAIN_SPLITS, DataError, parse_json_object, require_every_split

DEFAULT_CHAT_DATA = "support_triage.jsonl"
ROLES = ("system", "user", "assistant")
CLASSIFIER_KEYS = frozenset({"text", "label"})
CHAT_KEYS = frozenset({"messages", "prompt", "completion"})


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
    def reference(self) -> str:
        """The last assistant turn: the answer evaluation expects."""
        return self.messages[-1]["content"]


def default_chat_data_path() -> Path:
    """The support-triage dataset shipped with loracast (CC0-1.0, see data/README.md)."""
    return Path(str(resources.files("loracast") / "data" / DEFAULT_CHAT_DATA))


def data_kind(path: str | Path) -> str:
    """'chat' (messages or prompt/completion rows) or 'classification' (text/label rows) from the
    first row of a file; CSV files are classification data.

    Raises:
        DataError: the file is missing or its first row is neither kind.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist (or is not a file); pass a JSONL file of "
                        "messages or prompt/completion rows, or a CSV/JSONL file with 'text' and 'label'")
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
    if keys & CLASSIFIER_KEYS:
        return "classification"  # its reader names a missing 'text' or 'label'
    raise DataError(f"{path}: line {number} has fields {sorted(keys)}; expected 'messages', 'prompt' and "
                    "'completion' (instruction data) or 'text' and 'label' (classification data)")


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
