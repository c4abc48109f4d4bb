"""The device a run trains on (under torchrun or accelerate, transformers' `TrainingArguments` pick
each process's own), and the check of a launch."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from loracast.distributed.runtime import launched_world_size
from loracast.errors import LoracastError


class LaunchError(LoracastError):
    """The device asked for cannot be used, or the launcher's variables are incomplete."""


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


LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def check_launch(environ: Mapping[str, str] = os.environ) -> int:
    """The number of processes launched (WORLD_SIZE, 1 without a launcher), checked before any work.

    Raises:
        LaunchError: WORLD_SIZE asks for several processes but the launcher's other variables are missing.
    """
    try:
        world_size = launched_world_size(environ)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    missing = [name for name in LAUNCH_VARIABLES if name not in environ]
    if world_size > 1 and missing:
        raise LaunchError(f"WORLD_SIZE={world_size} asks for {world_size} processes, but {', '.join(missing)} "
                          f"are not set. Launch with torchrun --nproc_per_node {world_size}, or unset WORLD_SIZE "
                          "to run one process")
    return world_size
