"""``--packing``: several training examples in one row of at most ``--max-length`` tokens, none
attending to another.

Rows are filled best-fit decreasing (each example, longest first, goes into the fullest row it
fits), so little padding is left. Each example's positions restart at 0 and the row carries no
attention mask: transformers then builds a block-diagonal causal mask from the position restarts
(its packed-sequence format), so an example sees only its own tokens, exactly as when it is alone
in a row. The first token of each example is never a target, so no example learns to predict the
next one. Whether a model's attention honours the restarts is checked on the model itself before
training (`isolates_packed_examples`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from loracast.training.sft.template import IGNORE_INDEX, EncodedExample

# logits of an example packed beside another and alone must agree this closely (float32 model)
ISOLATION_ATOL = 1e-4


@dataclass(frozen=True)
class PackedRow:
    """Examples laid end to end, positions restarting at each."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    examples: int


def pack(encoded: Sequence[EncodedExample], max_length: int) -> list[PackedRow]:
    """`encoded` in rows of at most `max_length` tokens, best-fit decreasing; each example whole."""
    rows: list[list[EncodedExample]] = []
    room: list[int] = []
    for example in sorted(encoded, key=lambda e: -len(e.input_ids)):
        size = len(example.input_ids)
        fits = [i for i, free in enumerate(room) if free >= size]
        if fits:
            best = min(fits, key=lambda i: room[i])
            rows[best].append(example)
            room[best] -= size
        else:
            rows.append([example])
            room.append(max_length - size)
    return [_row(members) for members in rows]


def _row(members: Sequence[EncodedExample]) -> PackedRow:
    ids, labels, positions = [], [], []
    for example in members:
        ids.extend(example.input_ids)
        # the first token is predicted from the previous example's last one: never a target
        labels.extend([IGNORE_INDEX, *example.labels[1:]])
        positions.extend(range(len(example.input_ids)))
    return PackedRow(ids, labels, positions, len(members))


class PackedCollator:
    """Packed rows right-padded to the longest; the padding is a segment of its own (positions from
    0, no targets), so no real token attends to it. Also gives the real token and example counts
    (``num_tokens``, ``num_examples``), which the engine takes out before the model sees the batch."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[PackedRow]) -> dict[str, torch.Tensor]:
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            n = len(row.input_ids)
            ids[index, :n] = torch.tensor(row.input_ids)
            labels[index, :n] = torch.tensor(row.labels)
            positions[index, :n] = torch.tensor(row.position_ids)
            positions[index, n:] = torch.arange(width - n)
        return {"input_ids": ids, "labels": labels, "position_ids": positions,
                "num_tokens": torch.tensor(sum(len(r.input_ids) for r in rows)),
                "num_examples": torch.tensor(sum(r.examples for r in rows))}


@torch.no_grad()
def isolates_packed_examples(model: nn.Module, examples: Sequence[EncodedExample], device: torch.device) -> bool:
    """Whether `model` gives each of `examples` (two or more) the same logits packed in one row as alone."""
    members = list(examples)[:2]
    if len(members) < 2:
        return True  # nothing to pack together
    was_training = model.training
    model.eval()
    try:
        row = _row(members)
        packed = model(input_ids=torch.tensor([row.input_ids], device=device),
                       position_ids=torch.tensor([row.position_ids], device=device), use_cache=False).logits[0]
        start = 0
        for example in members:
            alone = model(input_ids=torch.tensor([example.input_ids], device=device), use_cache=False).logits[0]
            part = packed[start:start + len(example.input_ids)]
            start += len(example.input_ids)
            scale = float(alone.abs().max()) or 1.0
            if not torch.allclose(part.float(), alone.float(), rtol=0, atol=_tolerance(alone.dtype) * scale):
                return False
    finally:
        model.train(was_training)
    return True


def _tolerance(dtype: torch.dtype) -> float:
    # relative to the largest logit: float32 agrees to rounding; half precision to a few of its ulps
    return ISOLATION_ATOL if dtype == torch.float32 else 3e-2
