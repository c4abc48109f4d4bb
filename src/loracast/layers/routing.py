"""Per-sample adapter routing (``model(..., adapter_names=[...])``), without touching any module:
the names a call routes (`per_sample_adapters`), and how a layer reads them (`PerSampleNames`).

The names reach the LoRA layers deep inside the user's model through a context variable set for
the duration of one `PeftModel.forward` / `generate` call. No module is changed while a batch
runs, so concurrent calls stay independent: each thread (and each asyncio task) sees only the
names its own call set, and a nested call sees its own. PEFT instead registers a forward pre-hook
on every LoRA layer for the call, which two threads calling one model at once would overwrite.

A routed call applies to every loracast LoRA layer and modules_to_save wrapper that runs inside
it; an adapter name a layer does not hold leaves that sample on the base layer alone.

A process-wide count of the routed calls in progress sits in front of the context variable: while
no call anywhere is routed (the common case), a layer reads only that integer and never the context
variable. torch.compile cannot trace a context variable's ``get`` (a graph break in every LoRA layer
of a compiled model); it traces the integer and guards on it, and recompiles, reading the variable,
once a routed call begins.
"""

from __future__ import annotations

import contextlib
import threading
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
# How many `per_sample_adapters` blocks are open, in all threads and tasks: 0 means no layer needs the
# context variable (an int that torch.compile guards on, where it would break its graph on the variable)
_ROUTED_CALLS = 0
_ROUTED_CALLS_LOCK = threading.Lock()


def _count_routed_calls(step: int) -> None:
    global _ROUTED_CALLS
    with _ROUTED_CALLS_LOCK:
        _ROUTED_CALLS += step


@contextlib.contextmanager
def per_sample_adapters(adapter_names: Sequence[str], expansion: int = 1) -> Iterator[None]:
    """Route sample i of every batch run inside the block through adapter ``adapter_names[i]``
    (`expansion`: the rows `generate` makes of each sample, which then share its name)."""
    token = _PER_SAMPLE.set(PerSampleNames(tuple(adapter_names), expansion))
    _count_routed_calls(1)
    try:
        yield
    finally:
        _count_routed_calls(-1)
        _PER_SAMPLE.reset(token)


def routed_adapter_names() -> PerSampleNames | None:
    """The per-sample adapter names of the call in progress, or None when it is not routed
    (`PerSampleNames.for_batch` gives the name of each row a layer sees). Names apply to the work
    done inside the `per_sample_adapters` block: a task it started that outlives the block runs
    unrouted."""
    if _ROUTED_CALLS == 0:  # no routed call anywhere: skip the context variable torch.compile cannot trace
        return None
    return _PER_SAMPLE.get()
