"""What the trainer's data loader is built from for SFT: batches of similar lengths, and the
padding collator.

The sampler yields whole batches (lists of example indices) in the order
`lm_batching.length_grouped_batches` draws them, one seeded draw per epoch, so that epoch `e` of
a resumed run is the epoch `e` of an uninterrupted one. Under several processes accelerate
hands each process every N-th batch, so one global step of N processes trains the same
examples as N accumulated steps of one process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from loracast.training.chat_template import EncodedExample
from loracast.training.lm_batching import POOL_BATCHES, collate, length_grouped_batches


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
