"""Checks on the adapter tensors themselves: none found, several dtypes or compute modes in one
adapter, inf or nan, values close to float16's limit."""

from __future__ import annotations

from collections import defaultdict

import torch

from loracast.diagnostics.checks.registry import check, finding_kind
from loracast.diagnostics.checks.words import count
from loracast.diagnostics.inputs import Inventory, TensorRecord
from loracast.diagnostics.report import Finding
from loracast.dtypes import dtype_name

__all__ = [
    "FP16_MAX", "MIXED_ADAPTER_DTYPES", "MIXED_LORA_COMPUTE", "NEAR_FP16_FACTOR", "NEAR_FP16_LIMIT",
    "NON_FINITE_ADAPTER", "NO_ADAPTERS", "check_mixed_dtypes", "check_mixed_lora_compute", "check_no_adapters",
    "check_values", "lora_records",
]

FP16_MAX = torch.finfo(torch.float16).max
NEAR_FP16_FACTOR = 16.0  # headroom below float16's largest value that the LoRA product and merge can eat

NO_ADAPTERS = finding_kind(
    "no-adapters", "info", title="a live model holds no LoRA layers or modules_to_save copies",
    explanation="Only its base weights are summarised.")
MIXED_ADAPTER_DTYPES = finding_kind(
    "mixed-adapter-dtypes", "warning", title="one adapter's tensors are in several dtypes across layers",
    explanation="Layers round its updates differently and FSDP cannot flatten them together; usually part of the "
                "model was cast by hand after the adapter was made.")
MIXED_LORA_COMPUTE = finding_kind(
    "mixed-lora-compute", "warning",
    title="one adapter's LoRA Linear layers compute its branch in different modes (some \"fast\", some \"exact\")",
    explanation="Its outputs are neither the exact nor the fast ones its policy promises.")
NON_FINITE_ADAPTER = finding_kind(
    "non-finite-adapter", "error", title="inf or nan in adapter tensors",
    explanation="They spread to every output: training diverged, or values overflowed when cast to float16.")
NEAR_FP16_LIMIT = finding_kind(
    "near-fp16-limit", "warning", title=f"adapter values above {FP16_MAX:.0f}/{NEAR_FP16_FACTOR:.0f}",
    explanation="In float16 the LoRA branch and a merge multiply them further and overflow to inf.")


def lora_records(records: list[TensorRecord]) -> list[TensorRecord]:
    """The LoRA tensors among `records` (not modules_to_save copies, not base tensors a file carries)."""
    return [r for r in records if r.role not in ("copy", "base")]


@check(NO_ADAPTERS)
def check_no_adapters(inv: Inventory) -> list[Finding]:
    if inv.tensors or inv.load_problems or not inv.live or (inv.base_state and inv.base_state.requantized):
        return []  # a merged model has no adapters left: requantized-merge says what became of them
    return [NO_ADAPTERS.found(
        title="No LoRA adapters found", seen=[inv.subject],
        why="The model holds no LoRA layers or modules_to_save copies, so only its base weights are summarised.",
        fix="model = loracast.get_peft_model(model, loracast.LoraConfig(target_modules=\"all-linear\"))")]


@check(MIXED_ADAPTER_DTYPES)
def check_mixed_dtypes(inv: Inventory) -> list[Finding]:
    out = []
    by_adapter: dict[str, dict[torch.dtype, dict[str, list[str]]]] = defaultdict(lambda: defaultdict(dict))
    for r in lora_records(inv.tensors):
        by_adapter[r.adapter][r.dtype].setdefault(r.module, []).append(r.role)
    for adapter, by_dtype in by_adapter.items():
        if len(by_dtype) < 2:
            continue
        ranked = sorted(by_dtype.items(), key=lambda item: len(item[1]))
        seen = [f"{dtype_name(d)}: {m} [{','.join(roles)}]" for d, modules in ranked for m, roles in modules.items()]
        target = dtype_name(ranked[-1][0])
        out.append(MIXED_ADAPTER_DTYPES.found(
            title=f"Adapter {adapter!r} holds tensors in {len(by_dtype)} dtypes: "
                  + ", ".join(f"{dtype_name(d)} ({len(m)} modules)" for d, m in ranked),
            seen=seen,
            why="One adapter computes in different precisions in different places: layers with half-precision "
                "tensors round the updates and the LoRA branch differently from the rest, FSDP cannot flatten them "
                "together, and it usually means part of the model was cast by hand after the adapter was made "
                "(model.half(), a partial .to(), or adapters added or loaded with different dtype settings).",
            fix=f"for name, param in model.named_parameters():\n"
                f"    if \".lora_\" in name:\n"
                f"        param.data = param.data.to(torch.{target})\n"
                "# or make/load the adapter with one policy: precision=\"stable\" (float32) or \"fast\" (base dtype)"))
    return out


@check(MIXED_LORA_COMPUTE)
def check_mixed_lora_compute(inv: Inventory) -> list[Finding]:
    out = []
    for adapter, plan in inv.plans.items():
        if plan.get("lora_compute") != "mixed":
            continue
        fast = plan.get("fast_layers") or []
        out.append(MIXED_LORA_COMPUTE.found(
            title=f"Adapter {adapter!r} computes its LoRA branch \"fast\" in {count(len(fast), 'layer')} and "
                  "\"exact\" in the others",
            seen=[f"fast: {path}" for path in fast],
            why="The compute mode belongs to a layer, not to an adapter: layers this adapter shares with one made "
                "with precision=\"mixed\", or layers switched by set_lora_compute, run its branch in the activation "
                "dtype while the rest run it in the adapter dtype, so its outputs are neither the exact nor the "
                "fast ones its policy promises.",
            fix=f"loracast.set_lora_compute(model, \"exact\", adapter_name={adapter!r})  # or \"fast\" for all its layers"))
    return out


def _max_abs(record: TensorRecord) -> tuple[int, float]:
    values = record.values.detach()
    if values.numel() == 0:
        return 0, 0.0
    values = values.float() if values.dtype not in (torch.float32, torch.float64) else values
    bad = int((~torch.isfinite(values)).sum())
    finite = values[torch.isfinite(values)]
    return bad, float(finite.abs().max()) if finite.numel() else 0.0


@check(NON_FINITE_ADAPTER, NEAR_FP16_LIMIT)
def check_values(inv: Inventory) -> list[Finding]:
    non_finite, large = [], []
    limit = FP16_MAX / NEAR_FP16_FACTOR
    for r in inv.tensors:
        if not r.values.is_floating_point() or r.values.device.type == "meta":
            continue  # meta: not materialised yet, no values to check
        bad, biggest = _max_abs(r)
        if bad:
            non_finite.append(f"{r.name}: {bad} of {r.values.numel()} values are inf or nan")
        if biggest > limit:
            large.append(f"{r.name}: max |value| {biggest:.6g}")
    out = []
    if non_finite:
        out.append(NON_FINITE_ADAPTER.found(
            title=f"{count(len(non_finite), 'adapter tensor')} holding inf or nan", seen=non_finite,
            why="One inf or nan spreads to every output it touches: the adapter produces nan logits. Training "
                "diverged, or values overflowed when cast to float16 (saved or loaded in it).",
            fix="# reload a checkpoint saved before the divergence, then train in float32 with a lower learning rate:\n"
                "model = loracast.PeftModel.from_pretrained(base_model, earlier_checkpoint, is_trainable=True,\n"
                "                                           precision=\"stable\")\n"
                "torch.autograd.set_detect_anomaly(True)  # names the first operation that makes a nan"))
    if large:
        out.append(NEAR_FP16_LIMIT.found(
            title=f"{count(len(large), 'adapter tensor')} holding values above {limit:.0f} "
                  f"(float16's largest is {FP16_MAX:.0f})",
            seen=large,
            why="In float16 the LoRA branch (x @ A.T @ B.T * scaling) and a merge into a float16 base multiply these "
                "values further and overflow to inf. Harmless in float32 or bfloat16, but such values usually mean "
                "an unstable training run.",
            fix="model = loracast.PeftModel.from_pretrained(base_model, path, precision=\"stable\")  # float32 adapters\n"
                "# and keep the base in bfloat16 or float32 rather than float16"))
    return out
