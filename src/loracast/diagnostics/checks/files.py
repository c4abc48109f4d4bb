"""Checks on saved adapters: the file against the dtypes trained in (fingerprint), the environment
against the one saved in, files without a fingerprint (written by PEFT) loaded into a base, and
adapters that do not load.

Without a fingerprint, the file's own dtypes are the only record of how the adapter was trained:
PEFT writes each tensor in the dtype it had in memory, so a bfloat16 file means bfloat16 adapters
on a bfloat16 base.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch

from loracast.config import unsupported_options
from loracast.diagnostics.checks.registry import check, finding_kind
from loracast.diagnostics.checks.words import count
from loracast.diagnostics.inputs import Inventory, TensorRecord
from loracast.diagnostics.report import Finding
from loracast.dtypes import dtype_name

__all__ = [
    "ADAPTER_DTYPE_CHANGED", "ADAPTER_LOAD_FAILED", "BASE_DTYPE_UNLIKE_FILE", "ENVIRONMENT_CHANGED",
    "FILE_DTYPE_DIFFERS", "FINGERPRINT_UNREADABLE", "NO_FINGERPRINT", "SAVED_DTYPE_DIFFERS",
    "check_base_unlike_file", "check_file_dtype", "check_fingerprint_differences", "check_loading",
    "check_saved_dtype", "file_dtype", "keep_dtypes_fix",
]

_HALF = (torch.float16, torch.bfloat16)

SAVED_DTYPE_DIFFERS = finding_kind(
    "saved-dtype-differs", "warning", title="the file's dtype differs from the dtype trained in (save_dtype=)",
    explanation="A narrower file holds rounded copies of the trained values; a wider one is only larger.",
    other_severity="info", other_when="the file is wider")
ENVIRONMENT_CHANGED = finding_kind(
    "environment-changed", "warning", title="versions, device type, base dtypes or quantization differ from save time",
    explanation="Kernels and rounding change: outputs will not match those seen at save time exactly.")
ADAPTER_DTYPE_CHANGED = finding_kind(
    "adapter-dtype-changed", "warning", title="the adapter now computes in another dtype than at save",
    explanation="Its branch is rounded differently than in training, so outputs differ slightly.",
    other_severity="info", other_when="the dtypes were chosen explicitly at load")
FILE_DTYPE_DIFFERS = finding_kind(
    "file-dtype-differs", "warning",
    title="(no fingerprint, with a base) the adapter loads in another dtype than its file holds: PEFT's bf16 file "
          "becomes fp32 adapters",
    explanation="The file's dtype is the dtype it was trained in; outputs differ slightly from those seen then.")
BASE_DTYPE_UNLIKE_FILE = finding_kind(
    "base-dtype-unlike-file", "warning",
    title="(no fingerprint, with a base) a half-precision file loaded into a base of another dtype",
    explanation="Every layer rounds differently than in training: merged outputs and loss drift from training's.")
ADAPTER_LOAD_FAILED = finding_kind(
    "adapter-load-failed", "error", title="the adapter does not load into the given base",
    explanation="PeftModel.from_pretrained would raise the same error: another base, config or rank, or "
                "incomplete files.")
NO_FINGERPRINT = finding_kind(
    "no-fingerprint", "info", title="a saved adapter without a precision fingerprint (written by PEFT or another tool)",
    explanation="The training dtypes and environment are unknown; the fix writes a fingerprinted copy beside the "
                "original, in the file's own dtypes.")
FINGERPRINT_UNREADABLE = finding_kind(
    "fingerprint-unreadable", "warning", title="the precision fingerprint cannot be read",
    explanation="Loading works but skips the precision comparison.")


@check(SAVED_DTYPE_DIFFERS)
def check_saved_dtype(inv: Inventory) -> list[Finding]:
    seen, narrowed = [], False
    for r in inv.tensors:
        if r.file_dtype is None or r.trained_dtype is None or r.file_dtype == r.trained_dtype:
            continue
        seen.append(f"{r.name}: trained {dtype_name(r.trained_dtype)}, saved {dtype_name(r.file_dtype)}")
        narrowed |= torch.finfo(r.file_dtype).bits <= torch.finfo(r.trained_dtype).bits
    if not seen:
        return []
    why = ("The file holds rounded copies of the trained values: a float32-trained adapter saved in bfloat16 keeps "
           "8 of its 24 significant bits, so outputs after loading differ from those at the end of training."
           if narrowed else "The file is wider than the dtype trained in: values are exact, the file is larger than "
           "it needs to be.")
    return [SAVED_DTYPE_DIFFERS.found(
        severity="warning" if narrowed else "info",
        title=f"{count(len(seen), 'tensor')} saved in another dtype than trained in", seen=seen, why=why,
        fix="model.save_pretrained(path)  # without save_dtype=, each tensor keeps its trained dtype")]


def _environment_fix(differences) -> str:
    pins = [f"{d.what.removesuffix(' version')}=={d.saved}" for d in differences
            if d.kind == "version" and d.saved != "not installed"]
    lines = []
    if pins:
        lines.append(f"pip install {' '.join(pins)}  # the versions recorded at save")
    saved_dtype = next((d.saved for d in differences if d.kind == "model-dtype"), None)
    if saved_dtype or any(d.kind == "base-dtype" for d in differences):
        lines.append(f"base_model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.{saved_dtype or '<dtype at save>'})")
    if any(d.kind == "quantization" for d in differences):
        lines.append("# load the base with the BitsAndBytesConfig recorded at save (see the fingerprint)")
    if any(d.kind == "device" for d in differences):
        lines.append("# run on the device type recorded at save to reproduce its numbers exactly")
    lines.append("# or accept it knowingly; PeftModel.from_pretrained(..., strict_precision=True) refuses it")
    return "\n".join(lines)


@check(ENVIRONMENT_CHANGED, ADAPTER_DTYPE_CHANGED)
def check_fingerprint_differences(inv: Inventory) -> list[Finding]:
    environment, adapter_dtype = [], []
    for adapter, differences in inv.differences.items():
        prefix = f"{adapter}: " if len(inv.differences) > 1 else ""
        for d in differences:
            (adapter_dtype if d.kind == "adapter-dtype" else environment).append((adapter, prefix + str(d), d))
    out = []
    if environment:
        out.append(ENVIRONMENT_CHANGED.found(
            title=f"{count(len(environment), 'difference')} from the environment the adapter was saved in",
            seen=[s for _, s, _ in environment],
            why="Other library versions, devices, base dtypes or quantization settings change kernels and rounding: "
                "the adapter's outputs will not match those seen at save time exactly (and a different base dtype or "
                "quantization can change them noticeably).",
            fix=_environment_fix([d for _, _, d in environment])))
    if adapter_dtype:
        explicit = all(inv.plans.get(a, {}).get("explicit") for a, _, _ in adapter_dtype)
        out.append(ADAPTER_DTYPE_CHANGED.found(
            severity="info" if explicit else "warning",
            title="The adapter computes in another dtype than it was saved from", seen=[s for _, s, _ in adapter_dtype],
            why="A bfloat16-trained adapter loaded in float32 gives slightly different outputs (its branch is no "
                "longer rounded to bfloat16); the reverse rounds the trained values."
                + (" The dtypes were chosen explicitly at load." if explicit else ""),
            fix="model = loracast.PeftModel.from_pretrained(base_model, path, precision=\"match-training\")"))
    return out


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


@check(ADAPTER_LOAD_FAILED, NO_FINGERPRINT, FINGERPRINT_UNREADABLE)
def check_loading(inv: Inventory) -> list[Finding]:
    out = []
    # an adapter refused for its options is unsupported-peft-options' to explain
    failed = [f"{name}: {why}" for name, why in inv.load_problems.items()
              if not unsupported_options(inv.configs.get(name, {}))]
    if failed:
        out.append(ADAPTER_LOAD_FAILED.found(
            title="The adapter does not load into the given base model", seen=failed,
            why="PeftModel.from_pretrained would raise the same error: the adapter was saved for another base model, "
                "config or rank, or its files are incomplete.",
            fix="# pass the base model the adapter was trained on (its name is in adapter_config.json:\n"
                "# base_model_name_or_path), loaded as it was at training time"))
    missing = [name for name, fp in inv.fingerprints.items() if fp is None and name not in inv.fingerprint_problems]
    if missing:
        out.append(NO_FINGERPRINT.found(
            title="No precision fingerprint: the adapter was saved by PEFT or another tool", seen=missing,
            why="The dtypes it was trained in and the environment it was saved in are unknown, so they cannot be "
                "compared; the file's own dtypes are shown, and are the best record of the training dtype (PEFT "
                "writes tensors as they were in memory). Re-saving must keep them: loaded with the defaults, a "
                "bfloat16 file becomes float32 adapters and would be written back as float32.",
            fix=keep_dtypes_fix(inv, missing[0])))
    if inv.fingerprint_problems:
        out.append(FINGERPRINT_UNREADABLE.found(
            title="The precision fingerprint cannot be read",
            seen=[f"{name}: {why}" for name, why in inv.fingerprint_problems.items()],
            why="The file's metadata was damaged or edited; loading works but skips the precision comparison.",
            fix="model.save_pretrained(path)  # from the model that made the adapter, to write a fresh fingerprint"))
    return out


@check(FILE_DTYPE_DIFFERS)
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
    return [FILE_DTYPE_DIFFERS.found(
        title=f"{sum(seen.values())} adapter tensors compute in another dtype than their file holds (no fingerprint)",
        seen=[f"{what} (x{n})" if n > 1 else what for what, n in seen.items()],
        why="PEFT writes each tensor in the dtype it had in memory, so the file's dtype is the dtype the adapter was "
            "trained in. Loading upcasts half-precision files to float32 (autocast_adapter_dtype=True, in PEFT as "
            "in loracast): the values are exact, but the LoRA branch is no longer rounded as in training, so "
            "outputs differ slightly from those seen then; a float32 file loaded in half precision rounds the "
            "trained values.",
        fix=f"model = loracast.PeftModel.from_pretrained(base_model, path, adapter_dtype=torch.{dtype})  # as trained\n"
            "# PEFT: PeftModel.from_pretrained(base_model, path, autocast_adapter_dtype=False), with base_model\n"
            f"# loaded in torch.{dtype}")]


@check(BASE_DTYPE_UNLIKE_FILE)
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
    return [BASE_DTYPE_UNLIKE_FILE.found(
        title=f"A {file_dt} adapter file is loaded into a base computing in "
              + ", ".join(sorted({dtype_name(s[3]) for s in seen})) + " (no fingerprint)",
        seen=[f"{adapter}: {module}: file {dtype_name(d)}, base {dtype_name(used)}" for adapter, d, module, used in seen],
        why="A half-precision PEFT file comes from adapters trained on a base of that dtype (PEFT keeps adapters in "
            "the base dtype when autocast_adapter_dtype=False). On a base of another dtype every layer rounds "
            "differently than in training, and a merge writes the delta into weights that were never trained with "
            "it: the merged model's outputs and loss drift from those seen in training (peft#1388, peft#2502).",
        fix=f"base_model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.{file_dt})  # the dtype trained on\n"
            "model = loracast.PeftModel.from_pretrained(base_model, path)\n"
            "merged = model.merge_and_unload()")]
