"""What the trainer's data loader is built from for SFT: batches of similar lengths, and the
padding collators (right padding for training, left padding for batched generation).

Examples are shuffled, cut into pools of many batches, each pool sorted by length and cut into
batches, and the batches shuffled again: every batch holds sequences of similar length (little
padding to compute on), while the order of batches stays random from epoch to epoch.

The sampler yields whole batches (lists of example indices) in the order
`length_grouped_batches` draws them, one seeded draw per epoch, so that epoch `e` of
a resumed run is the epoch `e` of an uninterrupted one. Under several processes accelerate
hands each process every N-th batch, so one global step of N processes trains the same
examples as N accumulated steps of one process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from loracast.training.sft.template import IGNORE_INDEX, EncodedExample

POOL_BATCHES = 16  # batches sorted together: larger pools pad less but mix lengths less randomly


def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches (lists of indices into `lengths`), each of similar lengths, in random order."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    pool = batch_size * POOL_BATCHES
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def collate(examples: Sequence[EncodedExample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels, right-padded to the longest example, on `device`."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of prompts padded on the left, as batched generation needs."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(list(prompt))
            mask[row, width - len(prompt):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


class LengthGroupedBatches(Sampler[list[int]]):
    """Batches of indices into `lengths`, similar lengths together, in a seeded random order."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the order of epoch `epoch` next (the trainer calls this as each epoch starts)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch):  # one generator across epochs: replay the earlier epochs' draws
            length_grouped_batches(self.lengths, self.batch_size, generator)
        yield from length_grouped_batches(self.lengths, self.batch_size, generator)

    def __len__(self) -> int:
        pool = self.batch_size * POOL_BATCHES
        full, rest = divmod(len(self.lengths), pool)
        return full * POOL_BATCHES + -(-rest // self.batch_size)


class PadToLongest:
    """The collator: `input_ids`, `attention_mask` and `labels` right-padded to each batch's longest example."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[EncodedExample]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id, torch.device("cpu"))
