"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for loracast models.

FSDP2 shards every parameter on its own (a DTensor per parameter), so a bf16 frozen base and
fp32 adapters can share a unit: each keeps its dtype, sharded and gathered. What FSDP2 does
require is that the *trainable* parameters of one unit share one dtype (it reduces their
gradients together); `shard_model` checks this up front instead of failing at the first forward.

Mixed precision follows the model's own dtypes, which loracast's precision rules set:
`mixed_precision_policy` keeps every parameter in its stored dtype for compute (a bf16 base runs
in bf16, fp32 adapters in fp32, as in one process) and reduces low-precision gradients in fp32.
Passing ``compute_dtype=torch.bfloat16`` instead gathers and computes everything in bf16 while
the sharded adapters (and the optimizer step) stay fp32.

Save a sharded model with ``model.save_pretrained(dir, is_main_process=rank == 0)`` called on
**every** rank (or `loracast.distributed.save_adapter`): adapter tensors are gathered from their
shards and rank 0 writes PEFT's files, loadable in a single process.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from loracast.distributed.units import (
    FSDPSetupError,
    UnitProblem,
    format_problems,
    group_names,
    label,
    transformer_block_classes,
    unit_parameters,
)
from loracast.quant.sharding import prepare_quantized_for_sharding

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _trainable_dtypes(model: nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad}


def mixed_precision_policy(model: nn.Module, compute_dtype: torch.dtype | None = None) -> MixedPrecisionPolicy:
    """FSDP2's `MixedPrecisionPolicy` matching the model's precision rules.

    `compute_dtype` None: parameters are gathered and used in their stored dtype (the numerics of
    one process). A dtype: everything is gathered and computed in it, sharded parameters keep
    theirs. Gradients computed in bf16/fp16 are reduced in fp32.

    Raises:
        ValueError: the model has no trainable parameter, or `compute_dtype` is not floating.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    trainable = _trainable_dtypes(model)
    if not trainable:
        raise ValueError("the model has no trainable parameter; build it with get_peft_model (adapters train) "
                         "before sharding")
    if compute_dtype is not None and not compute_dtype.is_floating_point:
        raise ValueError(f"compute_dtype={compute_dtype} is not a floating dtype; use torch.bfloat16 or None")
    grad_dtypes = {compute_dtype} if compute_dtype is not None else trainable
    reduce_dtype = torch.float32 if grad_dtypes & set(_LOW_PRECISION) else None
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=reduce_dtype)


def fsdp2_shard_problems(model: nn.Module, units: Iterable[nn.Module]) -> list[UnitProblem]:
    """The units FSDP2 would reject: trainable parameters of several dtypes in one unit.

    (Integer-stored frozen weights are fine: FSDP2 shards each tensor on its own.)
    """
    problems: list[UnitProblem] = []
    for unit, params in unit_parameters(model, units).items():
        trainable = [(n, p) for n, p in params if p.requires_grad]
        if len({p.dtype for _, p in trainable}) > 1:
            problems.append(UnitProblem(
                unit, "mixed-trainable-dtype", group_names(trainable, label),
                "give every trainable tensor one dtype: get_peft_model(..., adapter_dtype=torch.float32) and "
                "bias='none' (trained base biases keep the base dtype)"))
    return problems


def _default_mesh(model: nn.Module) -> DeviceMesh:
    from torch.distributed.device_mesh import init_device_mesh

    device = next(model.parameters()).device
    device_type = "cuda" if device.type == "cuda" or dist.get_backend() == "nccl" else device.type
    return init_device_mesh(device_type, (dist.get_world_size(),))


def shard_model(model: nn.Module, *, block_classes: Iterable[type | str] | None = None,
                compute_dtype: torch.dtype | None = None, mp_policy: MixedPrecisionPolicy | None = None,
                mesh: DeviceMesh | None = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Shard a loracast model with FSDP2: one unit per transformer block, then the root; in place.

    Call it on every rank after `init_distributed()` and before building the optimizer (the
    optimizer must see the sharded parameters). Parameter dtypes are kept: a bf16 frozen base and
    fp32 adapters stay so, sharded. The model's forward, `save_pretrained` (on every rank) and
    parameter names are unchanged. bitsandbytes 4-bit layers are made safe to shard first
    (`prepare_quantized_for_sharding`).

    Args:
        model: a `PeftModel` (or any module holding loracast adapters).
        block_classes: the classes (or class names) to shard one by one; default: the model's
            ``_no_split_modules``.
        compute_dtype: see `mixed_precision_policy`; ignored when `mp_policy` is given.
        mp_policy: an FSDP2 `MixedPrecisionPolicy` to use as is.
        mesh: the device mesh; default: all ranks, on the parameters' device type.
        reshard_after_forward: free gathered parameters after each unit's forward (less memory).

    Returns:
        `model`, now an FSDP2 module.

    Raises:
        RuntimeError: no process group is initialised.
        FSDPSetupError: a unit holds trainable parameters of several dtypes.
        ValueError: block classes cannot be found, or the model has nothing to train.
    """
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_model needs a process group: call loracast.distributed.init_distributed() "
                           "first, under torchrun --nproc_per_node N")
    classes = transformer_block_classes(model, block_classes)
    blocks = [m for m in model.modules() if isinstance(m, classes)]
    problems = fsdp2_shard_problems(model, blocks)
    if problems:
        raise FSDPSetupError(format_problems(problems, "FSDP2 cannot shard this model"))
    policy = mp_policy if mp_policy is not None else mixed_precision_policy(model, compute_dtype)
    prepare_quantized_for_sharding(model)
    mesh = mesh if mesh is not None else _default_mesh(model)
    for block in reversed(blocks):  # inner units first, as fully_shard needs
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model
