"""Per-sample adapter routing (``model(..., adapter_names=[...])``), without touching any module.

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

from loracast.layers.per_sample import PerSampleNames

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
