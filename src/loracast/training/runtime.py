"""Where a training run executes: the device, and this process's place among its peers.

The training loop asks the runtime which rows of a global batch are its own, whether it may
write files and the progress bar, and how to wrap the model. Under torchrun (WORLD_SIZE > 1)
`loracast.training.ddp_runtime.DistributedRuntime` answers the same questions with DDP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from loracast.errors import LoracastError

T = TypeVar("T")


class LaunchError(LoracastError):
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
        """This process's share of `items` (all of them in one process)."""
        return list(items[self.rank::self.world_size])

    def share(self, items: Sequence[T]) -> tuple[list[T], float]:
        """(rows this process computes, factor for its mean loss) for one global training batch;
        the factor makes the gradient averaged over processes that of the global-batch mean."""
        return list(items), 1.0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call for training steps (a DDP wrapper when distributed)."""
        return model

    def mean(self, value: float, count: int = 1) -> float:
        """The mean over all processes' examples of `value`, this process's mean over `count` examples."""
        return value

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each of `values` summed over processes."""
        return list(values)

    def close(self) -> None:
        """Release what the runtime holds (the process group) at the end of a run."""


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
