"""The doctor's checks on an adapter file without a fingerprint (written by PEFT), loaded into a base.

Without a fingerprint, the file's own dtypes are the only record of how the adapter was trained:
PEFT writes each tensor in the dtype it had in memory, so a bfloat16 file means bfloat16 adapters
on a bfloat16 base. These checks compare that record with what loading made of it.

| id | severity | what |
|---|---|---|
| file-dtype-differs | warning | the adapter computes in another dtype than its file holds |
| base-dtype-unlike-file | warning | a half-precision file loaded into a base of another dtype |
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch

from loracast.diagnostics.inputs import Inventory, TensorRecord
from loracast.diagnostics.report import Finding
from loracast.dtypes import dtype_name

_HALF = (torch.float16, torch.bfloat16)


def _unfingerprinted(inv: Inventory) -> dict[str, list[TensorRecord]]:
    """Adapter name -> its LoRA tensors read from a file, for adapters without a fingerprint."""
    found: dict[str, list[TensorRecord]] = defaultdict(list)
    for r in inv.tensors:
        if r.role != "base" and r.file_dtype is not None and inv.fingerprints.get(r.adapter) is None \
                and r.adapter not in inv.fingerprint_problems:
            found[r.adapter].append(r)
    return found


def file_dtype(records: list[TensorRecord]) -> torch.dtype | None:
    """The dtype of an adapter's LoRA tensors in its file (the commonest, if several; None without any)."""
    counts = Counter(r.file_dtype for r in records if r.role != "copy" and r.file_dtype is not None)
    return counts.most_common(1)[0][0] if counts else None


def keep_dtypes_fix(inv: Inventory, adapter: str) -> str:
    """The no-fingerprint fix: re-save with a fingerprint, keeping the file's dtypes and the original."""
    dtype = file_dtype([r for r in inv.tensors if r.adapter == adapter])
    keep = f", adapter_dtype=torch.{dtype_name(dtype)}" if dtype is not None else ""
    lines = [f"model = loracast.PeftModel.from_pretrained(base_model, path{keep})  # the file's dtype, kept",
             "model.save_pretrained(path + \"-fingerprinted\")  # same values and dtypes, plus a fingerprint; "
             "the original stays"]
    copies = {r.file_dtype for r in inv.tensors if r.adapter == adapter and r.role == "copy"} - {dtype, None}
    if copies:
        lines.append(f"# modules_to_save copies ({', '.join(sorted(dtype_name(d) for d in copies))} in the file) are "
                     f"written in {dtype_name(dtype)}: values exact")
    lines.append("# load base_model in the dtype it was trained in: the fingerprint records it")
    return "\n".join(lines)


def check_file_dtype(inv: Inventory) -> list[Finding]:
    if not inv.live:
        return []  # a folder alone: nothing was loaded
    seen: Counter = Counter()
    target = {}
    for adapter, records in _unfingerprinted(inv).items():
        for r in records:
            if r.file_dtype != r.dtype:
                seen[f"{adapter}: {r.role} tensors: file {dtype_name(r.file_dtype)}, loaded {dtype_name(r.dtype)}"] += 1
                target.setdefault(adapter, file_dtype(records))
    if not seen:
        return []
    dtype = dtype_name(next(d for d in target.values() if d is not None))
    return [Finding(
        "file-dtype-differs", "warning",
        f"{sum(seen.values())} adapter tensors compute in another dtype than their file holds (no fingerprint)",
        [f"{what} (x{n})" if n > 1 else what for what, n in seen.items()],
        "PEFT writes each tensor in the dtype it had in memory, so the file's dtype is the dtype the adapter was "
        "trained in. Loading upcasts half-precision files to float32 (autocast_adapter_dtype=True, in PEFT as in "
        "loracast): the values are exact, but the LoRA branch is no longer rounded as in training, so outputs "
        "differ slightly from those seen then; a float32 file loaded in half precision rounds the trained values.",
        f"model = loracast.PeftModel.from_pretrained(base_model, path, adapter_dtype=torch.{dtype})  # as trained\n"
        "# PEFT: PeftModel.from_pretrained(base_model, path, autocast_adapter_dtype=False), with base_model\n"
        f"# loaded in torch.{dtype}")]


def check_base_unlike_file(inv: Inventory) -> list[Finding]:
    if not inv.live:
        return []
    seen = []
    for adapter, records in _unfingerprinted(inv).items():
        dtype = file_dtype(records)
        if dtype not in _HALF:
            continue  # a float32 file says nothing: PEFT writes float32 adapters on every base by default
        for module in dict.fromkeys(r.module for r in records if r.role != "copy"):
            base = inv.base_layers.get(module)
            used = (base.compute if base.backend else base.storage) if base is not None else None
            if used is not None and used.is_floating_point and used != dtype:
                seen.append((adapter, dtype, module, used))
    if not seen:
        return []
    file_dt = dtype_name(seen[0][1])
    return [Finding(
        "base-dtype-unlike-file", "warning",
        f"A {file_dt} adapter file is loaded into a base computing in "
        + ", ".join(sorted({dtype_name(s[3]) for s in seen})) + " (no fingerprint)",
        [f"{adapter}: {module}: file {dtype_name(d)}, base {dtype_name(used)}" for adapter, d, module, used in seen],
        "A half-precision PEFT file comes from adapters trained on a base of that dtype (PEFT keeps adapters in "
        "the base dtype when autocast_adapter_dtype=False). On a base of another dtype every layer rounds "
        "differently than in training, and a merge writes the delta into weights that were never trained with "
        "it: the merged model's outputs and loss drift from those seen in training (peft#1388, peft#2502).",
        f"base_model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.{file_dt})  # the dtype trained on\n"
        "model = loracast.PeftModel.from_pretrained(base_model, path)\n"
        "merged = model.merge_and_unload()")]


FILE_CHECKS = [check_file_dtype, check_base_unlike_file]
