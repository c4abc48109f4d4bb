"""The process group of a multi-process run: set-up, rank facts, and who gets which examples.

A run launched by ``torchrun`` (or any launcher that sets torch's ``env://`` variables: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) has ``WORLD_SIZE > 1``; `init_distributed`
then joins the process group with the backend that fits the device: NCCL for CUDA devices, gloo
for the CPU. Without those variables it returns a one-process context and starts nothing, so the
same code runs unchanged with and without ``torchrun``.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# Seconds a collective may wait before failing (instead of hanging); the variable overrides it.
TIMEOUT_ENV = "LORACAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run.

    Attributes:
        rank: this process's index among all processes (0 for a single process).
        world_size: how many processes train together.
        local_rank: this process's index on its machine (picks its GPU).
        device: the device this process computes on.
        backend: "nccl" or "gloo" once a process group is up; None for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints progress (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; it is set by the launcher "
                         "(torchrun): unset it, or launch with torchrun --nproc_per_node N") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={value} is negative; launch with torchrun --nproc_per_node N")
    return value


def launched_world_size(environ: Mapping[str, str] = os.environ) -> int:
    """The number of processes the launcher started (WORLD_SIZE), 1 when not launched by one."""
    return max(_env_int(environ, "WORLD_SIZE", 1), 1)


def choose_device(local_rank: int, device: torch.device | str | None = None) -> torch.device:
    """This process's device: `device` if given, else CUDA device `local_rank` when CUDA exists, else the CPU.

    Raises:
        ValueError: CUDA is present but has fewer devices than `local_rank` needs.
    """
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {count} CUDA device(s); launch at most "
                             f"{count} processes per machine (torchrun --nproc_per_node {count})")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def choose_backend(device: torch.device) -> str:
    """The collective backend for `device`: NCCL for CUDA (when built in), gloo otherwise."""
    if device.type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def _timeout(environ: Mapping[str, str]) -> timedelta:
    return timedelta(seconds=_env_int(environ, TIMEOUT_ENV, DEFAULT_TIMEOUT_S) or DEFAULT_TIMEOUT_S)


def current_context() -> DistContext:
    """The context of an already initialised process group (or of a single process); starts nothing."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext(device=choose_device(0))
    local_rank = _env_int(os.environ, "LOCAL_RANK", 0)
    backend = str(dist.get_backend())
    device = torch.device("cuda", local_rank) if "nccl" in backend else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def init_distributed(device: torch.device | str | None = None, backend: str | None = None) -> DistContext:
    """Join the launcher's process group (once) and return this process's context.

    Without a launcher (WORLD_SIZE unset or 1) nothing is started and the context says rank 0 of 1.
    Collectives fail after LORACAST_DIST_TIMEOUT seconds (default 1800) instead of hanging.

    Raises:
        RuntimeError: several processes were launched but this torch build has no torch.distributed.
        ValueError: the launcher's variables are malformed, or name a GPU this machine lacks.
    """
    if dist.is_available() and dist.is_initialized():
        return current_context()
    world_size = launched_world_size()
    local_rank = _env_int(os.environ, "LOCAL_RANK", 0)
    chosen = choose_device(local_rank, device)
    if world_size == 1:
        return DistContext(device=chosen)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size} asks for several processes, but this torch build has no "
                           "torch.distributed; install a torch build with distributed support")
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    chosen_backend = backend or choose_backend(chosen)
    try:
        dist.init_process_group(backend=chosen_backend, timeout=_timeout(os.environ))
    except ValueError as exc:  # a launcher variable is missing (RANK, MASTER_ADDR, ...)
        raise ValueError(f"WORLD_SIZE={world_size} asks for {world_size} processes, but the process group cannot "
                         f"start: {exc}. Launch with torchrun --nproc_per_node {world_size}, or unset WORLD_SIZE "
                         "to run one process") from exc
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, chosen, chosen_backend)


def is_main_process() -> bool:
    """True on rank 0, and in a run without a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if one was joined (call once at the end of a run, on every rank).

    Objects that still hold the group (a finished DDP wrapper waiting in a reference cycle) are
    collected first, and all ranks meet at a barrier: otherwise they are destroyed at interpreter
    exit, after the group, and gloo's threads abort the process ("terminate called without an
    active exception"; seen in about one run in three on busy cores).
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def rank_share(items: Sequence[T], rank: int, world_size: int) -> Sequence[T]:
    """This rank's contiguous share of one global batch: sizes differ by at most one, first ranks larger.

    Every rank must see the same `items` (same order); the shares partition it.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} process(es)")
    size, extra = divmod(len(items), world_size)
    start = rank * size + min(rank, extra)
    return items[start:start + size + (1 if rank < extra else 0)]


def global_mean_weight(local_count: int, global_count: int, world_size: int) -> float:
    """The factor that turns this rank's mean loss into its share of the global-batch mean.

    DDP averages gradients over ranks; multiplying each rank's mean loss by
    ``local_count * world_size / global_count`` makes that average the gradient of the mean
    over the whole global batch, even when ranks hold different numbers of examples.
    """
    if global_count <= 0:
        raise ValueError(f"global batch has {global_count} examples; it needs at least one")
    return local_count * world_size / global_count
