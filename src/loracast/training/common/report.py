"""What a run used and what it cost: dtypes and sizes of each kind of parameter, optimizer
state, peak memory, time per step. Pure functions returning JSON-ready dicts."""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from loracast.dtypes import dtype_name
from loracast.precision.view import adapter_part
from loracast.training.common.history import History

_KINDS = {"lora": "adapters", "copy": "modules_to_save"}


def _kind(name: str, param: torch.Tensor) -> str:
    part = adapter_part(name)
    if part is not None:
        return _KINDS[part]
    return "trainable_other" if param.requires_grad else "base"


def parameter_table(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per kind (base, adapters, modules_to_save, trainable_other): params and bytes by dtype,
    and whether they train."""
    table: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        entry = table.setdefault(_kind(name, param), {"params": 0, "bytes": 0, "dtypes": defaultdict(int),
                                                      "trainable": param.requires_grad})
        entry["params"] += param.numel()
        entry["bytes"] += param.numel() * param.element_size()
        entry["dtypes"][dtype_name(param.dtype)] += param.numel()
    for entry in table.values():
        entry["dtypes"] = dict(entry["dtypes"])
    return table


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's state tensors (AdamW: two per trainable parameter)."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor))


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory measurement (possible on CUDA; a process's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """The peak memory of this process: CUDA allocator peak on a GPU, else peak resident set size."""
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "what": "peak CUDA memory allocated"}
    try:
        import resource  # POSIX only
    except ImportError:
        return {"bytes": 0, "what": "peak memory unknown on this platform"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return {"bytes": int(peak * scale), "what": "peak resident set size of the process, model load included"}


def precision_summary(model: nn.Module, optimizer: torch.optim.Optimizer, history: History, policy: str,
                      device: torch.device) -> dict[str, Any]:
    """Dtypes, trainable parameters, memory and step time of a finished run."""
    table = parameter_table(model)
    trainable = sum(e["params"] for e in table.values() if e["trainable"])
    total = sum(e["params"] for e in table.values())
    return {
        "policy": policy,
        "parameters": table,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total if total else 0.0,
        "gradient_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "peak_memory": peak_memory(device),
        "seconds_per_step": history.step_seconds(),
        "examples_per_second": history.examples_per_second(),
    }
