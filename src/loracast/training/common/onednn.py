"""oneDNN's primitive cache, kept small for training on a CPU.

On a CPU, PyTorch runs bf16 matrix products (the frozen base's layers, attention's batched
products) through oneDNN, which keeps each primitive it creates in a cache keyed by shape, the
last 1,024 by default. Every batch length of a training run brings a new set of shapes, and each
cached primitive holds on to memory, so the process grows with each new length. On the demo's
60 steps of SmolLM2-135M (two threads, alternating runs) the training peak was 2,533 and 2,583 MiB
with the default capacity, 2,443 MiB with 64, 2,155 and 2,218 MiB with 8 and 2,040 MiB with none
cached, and training took 171 and 174 s by default, 160 s with 64, 142 and 152 s with 8 and 159 s
with none: the creation of a primitive costs less than the memory it keeps. `loracast train` keeps
8 (enough for one layer's products at one length, so repeated calls of one shape, as in
generation, still reuse theirs).

oneDNN reads its setting (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) when it creates its first
primitive, so `limit_primitive_cache` must run before the first bf16 product: `loracast train`
calls it before it loads anything. A value already in the environment wins.
"""

from __future__ import annotations

import os

CAPACITY_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
_OLD_NAME = "DNNL_PRIMITIVE_CACHE_CAPACITY"  # oneDNN still reads the name it had before
TRAINING_CAPACITY = 8


def limit_primitive_cache(capacity: int = TRAINING_CAPACITY) -> bool:
    """Have oneDNN cache at most `capacity` primitives in this process (see the module docstring);
    True where set, False where the environment already chooses it."""
    if CAPACITY_VARIABLE in os.environ or _OLD_NAME in os.environ:
        return False
    os.environ[CAPACITY_VARIABLE] = str(capacity)
    return True
