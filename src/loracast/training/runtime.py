"""Where a training run executes: the device, and this process's place among its peers.

The training loop asks the runtime which rows of a global batch are its own, whether it may
write files and the progress bar, and how to wrap the model. One process is the only case
implemented here; a distributed runtime (torchrun + DDP) answers the same questions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence, TypeVar

import torch
from torch import nn

T = TypeVar("T")


class LaunchError(ValueError):
    """The process was started in a way this runtime cannot serve."""


@dataclass(frozen=True)
class Runtime:
    """One training process: its device, rank and the number of processes."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share of a global batch (every `world_size`-th item from `rank`)."""
        return list(items[self.rank::self.world_size])

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call for training steps (a DDP wrapper when distributed)."""
        return model

    def mean(self, value: float) -> float:
        """`value` averaged over processes (for logged losses)."""
        return value


def pick_device(name: str = "auto") -> torch.device:
    """'auto' is CUDA when available, else the CPU; 'cpu' or 'cuda[:N]' are taken as given.

    Raises:
        LaunchError: CUDA was asked for and is not available, or the name is unknown.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise LaunchError(f"device {name!r} is not a device name; use auto, cpu or cuda") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LaunchError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
    return device


def runtime_from_environment(device: str = "auto") -> Runtime:
    """The runtime for this process.

    Raises:
        LaunchError: the process was launched as one of several (torchrun sets WORLD_SIZE > 1);
            distributed training is not supported by this version.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1:
        raise LaunchError(f"launched as {world_size} processes (WORLD_SIZE={world_size}), but distributed "
                            "training is not supported yet; run one process")
    return Runtime(device=pick_device(device))
