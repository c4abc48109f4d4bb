"""Labelled texts for classification: reading CSV / JSONL files and splitting off an eval set.

A file holds one example per row with a ``text`` and a ``label`` field, and optionally a
``split`` field ("train", or "test"/"eval"/"validation") that fixes the held-out set; without
it, a seeded, stratified fraction of each label is held out. Labels are names (strings); ids
are their positions in `LabelledTexts.label_names`.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from loracast.training.common.data import EVAL_SPLITS, TRAIN_SPLITS, parse_json_object, require_every_split
from loracast.training.common.errors import DataError

TEXT, LABEL, SPLIT = "text", "label", "split"
DEFAULT_DATA = "support_tickets.jsonl"


@dataclass(frozen=True)
class Example:
    """One row of a data file."""

    text: str
    label: str
    split: str | None
    line: int  # line number in the file, for messages


@dataclass
class LabelledTexts:
    """Texts with integer labels indexing `label_names`."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        """The rows at `indices`, in that order."""
        return LabelledTexts([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)


def default_data_path() -> Path:
    """The support-ticket intent dataset shipped with loracast (CC0-1.0, see data/README.md)."""
    return Path(str(resources.files("loracast") / "data" / DEFAULT_DATA))


def read_examples(path: str | Path) -> list[Example]:
    """Rows of a ``.csv`` or ``.jsonl`` file (chosen by extension; ``.json`` is read as JSON lines).

    Raises:
        DataError: the file is missing, unreadable, not UTF-8, malformed, lacks the ``text`` or
            ``label`` column, or has an empty text or label.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist (or is not a file); pass a CSV or JSONL file "
                        "with 'text' and 'label' columns")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json", ".ndjson"):
        raise DataError(f"data file {str(path)!r} has extension {suffix or '(none)'!r}; use .csv or .jsonl")
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = _read_csv(handle, path) if suffix == ".csv" else _read_jsonl(handle, path)
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "save it as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"cannot read data file {str(path)!r}: {exc.strerror or exc}") from exc
    if not rows:
        raise DataError(f"data file {str(path)!r} holds no examples")
    return rows


def _example(text: object, label: object, split: object, path: Path, line: int) -> Example:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{path}: line {line} has an empty or non-text 'text' ({text!r})")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        raise DataError(f"{path}: line {line} has an invalid 'label' {label!r}; use a name or an integer")
    split_name = None
    if split is not None and str(split).strip():
        split_name = str(split).strip().lower()
        if split_name not in TRAIN_SPLITS | EVAL_SPLITS:
            raise DataError(f"{path}: line {line} has split {split!r}; use 'train' or 'test' (or leave it empty)")
    return Example(text, str(label).strip(), split_name, line)


def _read_csv(handle, path: Path) -> list[Example]:
    reader = csv.DictReader(handle)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in (TEXT, LABEL) if c not in columns]
    if missing:
        raise DataError(f"{path}: the header has columns {columns}; expected 'text' and 'label' (missing: "
                        f"{', '.join(missing)}). Rename the columns in the first row")
    reader.fieldnames = columns
    rows = []
    try:
        for record in reader:
            rows.append(_example(record.get(TEXT), record.get(LABEL), record.get(SPLIT), path, reader.line_num))
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num} is not valid CSV: {exc}") from exc
    return rows


def _read_jsonl(handle, path: Path) -> list[Example]:
    rows = []
    for number, raw in enumerate(handle, start=1):
        if not raw.strip():
            continue
        record = parse_json_object(raw, path, number, '{"text": "...", "label": "..."}')
        missing = [c for c in (TEXT, LABEL) if c not in record]
        if missing:
            raise DataError(f"{path}: line {number} has fields {sorted(record)}; expected 'text' and 'label' "
                            f"(missing: {', '.join(missing)})")
        rows.append(_example(record[TEXT], record[LABEL], record.get(SPLIT), path, number))
    return rows


def label_order(labels: Sequence[str]) -> list[str]:
    """Distinct labels, numerically ordered when all are integers, else alphabetically."""
    distinct = set(labels)
    if all(_is_int(label) for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def to_labelled(examples: Sequence[Example], label_names: Sequence[str], source: str) -> LabelledTexts:
    """Examples as texts + label ids.

    Raises:
        DataError: an example's label is not in `label_names` (named with its line).
    """
    index = {name: i for i, name in enumerate(label_names)}
    for example in examples:
        if example.label not in index:
            raise DataError(f"{source}: line {example.line} has unknown label {example.label!r}; expected one of "
                            f"{', '.join(label_names)}")
    return LabelledTexts([e.text for e in examples], [index[e.label] for e in examples], list(label_names))


def split_examples(examples: Sequence[Example], source: str, eval_fraction: float = 0.2, seed: int = 0,
                   label_names: Sequence[str] | None = None) -> tuple[LabelledTexts, LabelledTexts]:
    """(train, eval): by the file's ``split`` field when present, else a stratified random split.

    `label_names` fixes the label set and order (e.g. from ``--labels`` or a trained head); by
    default it is every label of the file (see `label_order`).

    Raises:
        DataError: unknown labels, fewer than two labels, rows lacking a split when others have one,
            or too few examples to hold any out.
    """
    names = list(label_names) if label_names is not None else label_order([e.label for e in examples])
    if len(names) < 2:
        raise DataError(f"{source}: every example has label {names[0]!r}; classification needs at least two labels")
    with_split = [e for e in examples if e.split is not None]
    if with_split:
        require_every_split(examples, source)
        train = [e for e in examples if e.split in TRAIN_SPLITS]
        held = [e for e in examples if e.split in EVAL_SPLITS]
        if not train or not held:
            raise DataError(f"{source}: the split column needs both 'train' and 'test' rows "
                            f"(found {len(train)} train, {len(held)} test)")
    else:
        if not 0.0 < eval_fraction < 1.0:
            raise DataError(f"eval fraction {eval_fraction} must be between 0 and 1")
        train, held = _stratified(examples, eval_fraction, seed)
        if not held or not train:
            raise DataError(f"{source}: {len(examples)} examples are too few to hold out an eval set; add examples "
                            "(at least two per label)")
    return to_labelled(train, names, source), to_labelled(held, names, source)


def _stratified(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    train: list[Example] = []
    held: list[Example] = []
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        count = min(len(group) - 1, max(1, round(len(group) * fraction))) if len(group) > 1 else 0
        held.extend(group[:count])
        train.extend(group[count:])
    return train, held


def load_data(path: Path | None, labels: list[str] | None, eval_fraction: float, seed: int
              ) -> tuple[LabelledTexts, LabelledTexts, Path]:
    """(train, eval, file) for a run; the shipped dataset when `path` is None."""
    source = Path(path) if path is not None else default_data_path()
    examples = read_examples(source)
    train, held_out = split_examples(examples, str(source), eval_fraction=eval_fraction, seed=seed,
                                     label_names=labels)
    return train, held_out, source
