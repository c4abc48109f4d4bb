"""Per-sample adapter names (``adapter_names=[...]`` in forward and generate) as layers see them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loracast.errors import LoracastError


@dataclass(frozen=True)
class PerSampleNames:
    """One adapter name per input sample, and how many rows `generate` makes of each sample.

    `generate` repeats every sample ``max(num_beams, num_return_sequences)`` times before the
    decoder runs (an encoder still sees the original batch), so a layer may see either batch
    size; each name then stands for all the rows made from its sample, as in PEFT.
    """

    names: tuple[str, ...]
    expansion: int = 1

    def for_batch(self, batch: int) -> Sequence[str]:
        """The name of each of `batch` rows.

        Raises:
            ValueError: `batch` is neither the number of names nor that times the expansion.
        """
        if batch == len(self.names):
            return self.names
        if self.expansion > 1 and batch == len(self.names) * self.expansion:
            return [name for name in self.names for _ in range(self.expansion)]
        expanded = f" (or {len(self.names) * self.expansion} after generate's x{self.expansion} expansion)" \
            if self.expansion > 1 else ""
        raise LoracastError(f"adapter_names has {len(self.names)} entries{expanded} but the batch has {batch} samples; "
                            "give one adapter name (or '__base__') per input sample")
