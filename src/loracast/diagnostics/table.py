"""The doctor's table and dtype summary, as data (rendered by `render`, or as JSON)."""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

from loracast.diagnostics.inputs import Inventory, TensorRecord
from loracast.dtypes import dtype_name


def table_rows(inventory: Inventory) -> list[dict[str, Any]]:
    """One row per (adapted module, adapter): base storage/compute dtypes, adapter dtypes by role,
    requires_grad, device; folder rows also carry the file and trained dtypes where they differ."""
    grouped: OrderedDict[tuple[str, str], list[TensorRecord]] = OrderedDict()
    for record in inventory.tensors:
        if record.role != "base":
            grouped.setdefault((record.module, record.adapter), []).append(record)
    rows = []
    for (module, adapter), records in grouped.items():
        base = inventory.base_layers.get(module)
        grads = {r.requires_grad for r in records}
        row: dict[str, Any] = {
            "module": module, "adapter": adapter,
            "kind": "modules_to_save" if records[0].role == "copy" else "lora",
            "base": dtype_name(base.storage) if base else None,
            "compute": dtype_name(base.compute) if base and base.backend else None,
            "quantization": base.backend if base else None,
            "dtypes": {r.role: dtype_name(r.dtype) for r in records},
            "requires_grad": None if grads == {None} else (grads.pop() if len(grads) == 1 else "mixed"),
            "device": ",".join(sorted({r.device for r in records if r.device})) or None,
        }
        trained = {r.role: dtype_name(r.trained_dtype) for r in records
                   if r.trained_dtype is not None and r.trained_dtype != r.dtype}
        if trained:
            row["trained"] = trained
        saved = {r.role: dtype_name(r.file_dtype) for r in records
                 if r.file_dtype is not None and r.file_dtype != r.dtype}
        if saved:
            row["file"] = saved
        rows.append(row)
    return rows


def summary_lines(inventory: Inventory) -> list[dict[str, Any]]:
    """Per dtype: adapter tensors, their values, modules_to_save tensors, base parameters (live
    models), and adapted base layers stored or computing in it."""
    tensors, values, copies, stored, computing = Counter(), Counter(), Counter(), Counter(), Counter()
    params = Counter({dtype_name(d): n for d, n in inventory.base_params.items()})
    for record in inventory.tensors:
        name = dtype_name(record.dtype)
        if record.role == "copy":
            copies[name] += 1
        elif record.role != "base":
            tensors[name] += 1
        values[name] += record.values.numel() if record.role != "base" else 0
    for info in inventory.base_layers.values():
        if info.storage is not None:
            stored[dtype_name(info.storage)] += 1
        if info.backend and info.compute is not None:
            computing[dtype_name(info.compute)] += 1
    names = sorted(set(tensors) | set(copies) | set(stored) | set(computing) | set(params),
                   key=lambda n: (-(tensors[n] + copies[n]), -params[n], n))
    return [{"dtype": n, "adapter_tensors": tensors[n], "adapter_values": values[n], "modules_to_save_tensors": copies[n],
             "base_parameters": params[n], "base_layers_stored": stored[n], "base_layers_computing": computing[n]}
            for n in names]


def quantization_lines(inventory: Inventory) -> list[dict[str, Any]]:
    """Per quantization backend, storage and compute dtype and requantization config: how many
    adapted base layers are of that kind."""
    groups: Counter = Counter()
    for info in inventory.base_layers.values():
        if info.backend:
            groups[(info.backend, dtype_name(info.storage), dtype_name(info.compute), info.config,
                    info.config_source)] += 1
    return [{"backend": backend, "layers": n, "storage": storage, "compute": compute, "requantize_config": config,
             "config_source": source}
            for (backend, storage, compute, config, source), n in sorted(groups.items(), key=lambda kv: str(kv[0]))]
