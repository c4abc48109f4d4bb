"""`loracast train` under torchrun: the training loop's runtime, with DDP.

Every process builds the same model and walks the same global batches (same seed, same order);
`share` hands each its contiguous rows with the factor that makes DDP's averaged gradient that
of the whole global batch's mean loss, so the adapter matches one process's within
floating-point reduction error (with dropout off: each process draws its own dropout masks).
Only rank 0 writes files and the progress bar; evaluation is split across processes and summed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from loracast.distributed.ddp import wrap_ddp
from loracast.distributed.runtime import DistContext, global_mean_weight, init_distributed, rank_share, shutdown
from loracast.training.runtime import LaunchError, Runtime, pick_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedRuntime(Runtime):
    """One of several training processes, joined in a process group; the model trains under DDP."""

    local_rank: int = 0
    backend: str = "gloo"

    @classmethod
    def start(cls, device: str = "auto") -> DistributedRuntime:
        """Join torchrun's process group: gloo on the CPU, NCCL on CUDA (one GPU per process).

        Raises:
            LaunchError: the device cannot be used, or the launcher's variables are malformed.
        """
        try:
            chosen = None if device == "auto" else pick_device(device)
            if chosen is not None and chosen.type == "cuda" and chosen.index is None:
                chosen = None  # one GPU per process: cuda:LOCAL_RANK
            context = init_distributed(device=chosen)
        except ValueError as exc:
            raise LaunchError(str(exc)) from None
        return cls(device=context.device, rank=context.rank, world_size=context.world_size,
                   local_rank=context.local_rank, backend=context.backend or "gloo")

    def _context(self) -> DistContext:
        return DistContext(self.rank, self.world_size, self.local_rank, self.device, self.backend)

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's contiguous share of `items`."""
        return list(rank_share(items, self.rank, self.world_size))

    def share(self, items: Sequence[T]) -> tuple[list[T], float]:
        rows = self.shard(items)
        if not rows:  # fewer rows than processes: DDP still needs this process's backward, weighted 0
            return list(items[:1]), 0.0
        return rows, global_mean_weight(len(rows), len(items), self.world_size)

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` in DDP (rank 0's weights are broadcast); from here on each process draws its own
        random numbers (dropout masks), as one process would draw different ones per example."""
        if self.rank:
            torch.manual_seed(torch.initial_seed() + self.rank)
        return wrap_ddp(model, self._context())

    def sum(self, values: Sequence[float]) -> list[float]:
        totals = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        return totals.tolist()

    def mean(self, value: float, count: int = 1) -> float:
        weighted, total = self.sum([value * count, count])
        return weighted / total if total else float("nan")

    def close(self) -> None:
        shutdown()


def runtime_from_environment(device: str = "auto") -> Runtime:
    """The runtime for this process.

    Raises:
        LaunchError: the device cannot be used, or the launcher's variables are malformed.
    """
    from loracast.distributed.runtime import launched_world_size

    try:
        world_size = launched_world_size()
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    if world_size > 1:  # torchrun: DDP over gloo (CPU) or NCCL (CUDA)
        return DistributedRuntime.start(device)
    return Runtime(device=pick_device(device))
