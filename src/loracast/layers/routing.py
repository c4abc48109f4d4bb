"""Per-sample adapter routing (``model(..., adapter_names=[...])``), without touching any module:
the names a call routes (`per_sample_adapters`), and how a layer reads them (`PerSampleNames`).

The names reach the LoRA layers deep inside the user's model through a context variable set for
the duration of one `PeftModel.forward` / `generate` call. No module is changed while a batch
runs, so concurrent calls stay independent: each thread (and each asyncio task) sees only the
names its own call set, and a nested call sees its own. PEFT instead registers a forward pre-hook
on every LoRA layer for the call, which two threads calling one model at once would overwrite.

A routed call applies to every loracast LoRA layer and modules_to_save wrapper that runs inside
it; an adapter name a layer does not hold leaves that sample on the base layer alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
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


# The adapter names of the batch being routed (one per sample, '__base__': none), or None.
_PER_SAMPLE: ContextVar[PerSampleNames | None] = ContextVar("loracast_per_sample_adapters", default=None)


@contextlib.contextmanager
def per_sample_adapters(adapter_names: Sequence[str], expansion: int = 1) -> Iterator[None]:
    """Route sample i of every batch run inside the block through adapter ``adapter_names[i]``
    (`expansion`: the rows `generate` makes of each sample, which then share its name)."""
    token = _PER_SAMPLE.set(PerSampleNames(tuple(adapter_names), expansion))
    try:
        yield
    finally:
        _PER_SAMPLE.reset(token)


def routed_adapter_names() -> PerSampleNames | None:
    """The per-sample adapter names of the call in progress, or None when it is not routed
    (`PerSampleNames.for_batch` gives the name of each row a layer sees)."""
    return _PER_SAMPLE.get()
