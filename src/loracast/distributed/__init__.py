"""Distributed training of loracast models on torch.distributed: DDP, FSDP2 and FSDP1.

Launch with ``torchrun --nproc_per_node N script.py``; in the script::

    from loracast.distributed import init_distributed, shard_model, save_adapter

    ctx = init_distributed()                  # gloo on the CPU, NCCL on CUDA; rank 0 of 1 without torchrun
    model = get_peft_model(base.to(ctx.device), config)
    model = shard_model(model)                # FSDP2: per transformer block; or wrap_ddp(model, ctx)
    ...train...
    save_adapter(model, "out/adapter")        # every rank; rank 0 writes PEFT's files

FSDP1 users (accelerate / Trainer configs) pass ``fsdp1_auto_wrap_policy(model)`` as the auto-wrap
policy, so a bf16 base and fp32 adapters never share one flattened tensor.
"""

from loracast.distributed.accelerate_env import FSDP1Setup, accelerate_fsdp1_setup
from loracast.distributed.checkpoint import save_adapter, unwrap_peft_model
from loracast.distributed.ddp import wrap_ddp
from loracast.distributed.fsdp import fsdp2_shard_problems, mixed_precision_policy, shard_model
from loracast.distributed.fsdp1 import (
    SeparateAdaptersPolicy,
    check_fsdp1,
    explain_flatten_errors,
    fsdp1_auto_wrap_policy,
    fsdp1_flatten_problems,
)
from loracast.distributed.runtime import (
    DistContext,
    barrier,
    choose_backend,
    current_context,
    global_mean_weight,
    init_distributed,
    is_main_process,
    rank_share,
    shutdown,
)
from loracast.distributed.units import FSDPSetupError, UnitProblem, transformer_block_classes
from loracast.quant.sharding import prepare_quantized_for_sharding

__all__ = [
    "DistContext",
    "FSDP1Setup",
    "FSDPSetupError",
    "SeparateAdaptersPolicy",
    "UnitProblem",
    "accelerate_fsdp1_setup",
    "barrier",
    "check_fsdp1",
    "choose_backend",
    "current_context",
    "explain_flatten_errors",
    "fsdp1_auto_wrap_policy",
    "fsdp1_flatten_problems",
    "fsdp2_shard_problems",
    "global_mean_weight",
    "init_distributed",
    "is_main_process",
    "mixed_precision_policy",
    "prepare_quantized_for_sharding",
    "rank_share",
    "save_adapter",
    "shard_model",
    "shutdown",
    "transformer_block_classes",
    "unwrap_peft_model",
    "wrap_ddp",
]
