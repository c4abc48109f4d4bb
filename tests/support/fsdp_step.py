"""One FSDP1 training step in this process (gloo, world size 1, CPU), for tests of what FSDP accepts."""

from __future__ import annotations

import tempfile

import torch
from torch import nn


def fsdp1_step(model: nn.Module, vocab_size: int = 128) -> None:
    """Wrap `model` with FSDP1 (use_orig_params=True) and run forward + backward on one batch.

    Raises what FSDP raises, e.g. ValueError "Must flatten tensors with uniform dtype".
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    try:
        wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
        ids = torch.randint(0, vocab_size, (1, 8))
        wrapped(input_ids=ids, labels=ids).loss.backward()
    finally:
        dist.destroy_process_group()
