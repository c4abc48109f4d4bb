"""Saving an adapter from a distributed run: DDP, FSDP2 or FSDP1, in PEFT's format, by rank 0.

Every rank calls `save_adapter`; the tensors are gathered where they are sharded and rank 0
writes the folder, which then loads in a single process like any other adapter.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from loracast.distributed.runtime import barrier, is_main_process
from loracast.tuner.peft_model import PeftModel


def unwrap_peft_model(model: nn.Module) -> PeftModel:
    """The `PeftModel` inside DDP or FSDP1 wrappers (an FSDP2 model is one already).

    Raises:
        TypeError: no `PeftModel` is found.
    """
    inner = model
    for _ in range(4):  # DDP(FSDP1(PeftModel)) is as deep as launchers nest
        if isinstance(inner, PeftModel):
            return inner
        inner = getattr(inner, "module", None)
        if not isinstance(inner, nn.Module):
            break
    raise TypeError(f"{type(model).__name__} holds no loracast PeftModel; build one with get_peft_model and "
                    "wrap it with DDP/FSDP afterwards")


def _is_fsdp1(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


@contextlib.contextmanager
def _full_fsdp1_params(model: nn.Module) -> Iterator[None]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    on_gpu = any(p.device.type == "cuda" for p in model.parameters())
    # every rank enters (it gathers); only rank 0 keeps the full tensors, on the CPU when they were on a GPU
    with FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True,
                                                     offload_to_cpu=on_gpu):
        yield


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, *,
                 selected_adapters: Sequence[str] | None = None,
                 save_dtype: torch.dtype | str | None = None) -> None:
    """Save the adapters of a model trained with DDP, FSDP2 or FSDP1 (or in one process).

    Call it on every rank: sharded tensors are gathered (a collective) and rank 0 writes PEFT's
    files; all ranks return once the files are complete.

    Raises:
        TypeError: `model` holds no loracast `PeftModel`.
        ValueError: as `PeftModel.save_pretrained`.
    """
    peft_model = unwrap_peft_model(model)
    main = is_main_process()
    gathered = _full_fsdp1_params(model) if _is_fsdp1(model) else contextlib.nullcontext()
    with gathered:
        if main or not _is_fsdp1(model):  # FSDP1 hands the full tensors to rank 0 alone
            peft_model.save_pretrained(save_directory, selected_adapters=selected_adapters, save_dtype=save_dtype,
                                       is_main_process=main)
    barrier()
