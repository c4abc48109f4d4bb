"""Checks on a live model's frozen base (read by `loracast.diagnostics.base_state`): parameters
upcast to float32 in a half-precision model, several float dtypes, inf or nan in base weights."""

from __future__ import annotations

from collections import defaultdict

import torch

from loracast.diagnostics.base_state import BaseState, FrozenParam
from loracast.diagnostics.checks.registry import check, finding_kind
from loracast.diagnostics.checks.words import grouped, size
from loracast.diagnostics.inputs import Inventory
from loracast.diagnostics.report import Finding
from loracast.dtypes import dtype_name

__all__ = [
    "MIXED_FROZEN_DTYPES", "NON_FINITE_BASE", "UPCAST_FROZEN_PARAMS", "cast_frozen_fix", "check_mixed_frozen",
    "check_non_finite_base", "check_upcast_frozen",
]

_HALF = (torch.float16, torch.bfloat16)

UPCAST_FROZEN_PARAMS = finding_kind(
    "upcast-frozen-params", "warning",
    title="frozen non-norm parameters in float32 in a model that declares a half dtype "
          "(prepare_model_for_kbit_training's upcast; on a model that is not quantized, the whole base), "
          "with the memory it costs",
    explanation="Frozen weights gain nothing from float32 but memory: twice the parameter memory of the declared "
                "dtype for each of them.")
MIXED_FROZEN_DTYPES = finding_kind(
    "mixed-frozen-dtypes", "warning",
    title="frozen unquantized base parameters in several float dtypes (fp32 norms beside a bf16 lm_head)",
    explanation="Forward passes outside autocast fail with 'expected m1 and m2 to have the same dtype'.")
NON_FINITE_BASE = finding_kind(
    "non-finite-base", "error", title="inf or nan in base weights (an overflowing float16 merge)",
    explanation="Every output they touch becomes nan.")


def cast_frozen_fix(dtype: torch.dtype) -> str:
    """Code that puts every frozen, unquantized base parameter of `model` in `dtype`
    (adapters, modules_to_save copies and packed quantized weights untouched)."""
    return ("for path, module in model.named_modules():\n"
            "    if \"lora_\" in path or \"modules_to_save\" in path:\n"
            "        continue  # adapters and their trained copies keep their dtype\n"
            "    for param in module.parameters(recurse=False):\n"
            "        if not param.requires_grad and param.is_floating_point() and not hasattr(param, \"quant_state\"):\n"
            f"            param.data = param.data.to(torch.{dtype_name(dtype)})")


def _state(inv: Inventory) -> BaseState | None:
    return inv.base_state if inv.live else None


@check(UPCAST_FROZEN_PARAMS)
def check_upcast_frozen(inv: Inventory) -> list[Finding]:
    state = _state(inv)
    if state is None or state.declared not in _HALF:
        return []
    upcast = [p for p in state.frozen if p.dtype == torch.float32 and not p.is_norm]
    if not upcast:
        return []
    declared = dtype_name(state.declared)
    held = sum(p.nbytes for p in upcast)
    extra = held - sum(p.numel for p in upcast) * (torch.finfo(state.declared).bits // 8)
    norms = sum(1 for p in state.frozen if p.dtype == torch.float32 and p.is_norm)
    norms_note = f" ({norms} float32 norm parameters are left out: they are small.)" if norms else ""
    title = (f"{len(upcast)} frozen base parameters are float32 in a {declared} model: {size(extra)} more than in "
             f"{declared} ({held:,} bytes where {declared} needs {held - extra:,})")
    if not state.quantized:
        return [UPCAST_FROZEN_PARAMS.found(
            title=title, seen=grouped([p.name for p in upcast]),
            why=f"The model declares {declared} and holds no quantized layer, yet its frozen base is float32: twice "
                f"the parameter memory. prepare_model_for_kbit_training (PEFT's, or loracast's with upcast=\"all\") "
                "does this to a model that is not quantized: it is meant for 4-bit and 8-bit models, whose "
                "unquantized rest it upcasts, and here it upcasts everything. Frozen weights gain nothing from "
                "float32; the adapters are float32 either way (autocast_adapter_dtype=True)." + norms_note,
            fix="# prepare_model_for_kbit_training is for 4-bit and 8-bit models: leave it out on this one.\n"
                f"# On this model, cast the frozen base back to {declared}:\n"
                f"{cast_frozen_fix(state.declared)}\n"
                "# or make the model again without it (get_peft_model freezes the base itself):\n"
                f"model = loracast.get_peft_model(base_model, config)  # base_model in {declared}; "
                "peft.get_peft_model likewise")]
    return [UPCAST_FROZEN_PARAMS.found(
        title=title, seen=grouped([p.name for p in upcast]),
        why="prepare_model_for_kbit_training (PEFT's, or loracast's with upcast=\"all\") casts every frozen "
            "half-precision parameter that is not quantized to float32: embeddings, lm_head, biases, unquantized "
            "layers. Frozen weights gain nothing from float32 but memory; on a large vocabulary the float32 "
            "embedding and head can outweigh the 4-bit layers." + norms_note,
        fix=f"{cast_frozen_fix(state.declared)}\n"
            "# or, before training: model = loracast.prepare_model_for_kbit_training(model, upcast=\"none\")\n"
            "# (upcast=\"norms\" keeps float32 norms, which then need torch.autocast: see mixed-frozen-dtypes)")]


def _by_dtype(frozen: list[FrozenParam]) -> dict[torch.dtype, list[str]]:
    found: dict[torch.dtype, list[str]] = defaultdict(list)
    for p in frozen:
        found[p.dtype].append(p.name)
    return found


@check(MIXED_FROZEN_DTYPES)
def check_mixed_frozen(inv: Inventory) -> list[Finding]:
    state = _state(inv)
    if state is None:
        return []
    by_dtype = _by_dtype(state.frozen)
    if len(by_dtype) < 2:
        return []
    target = state.declared if state.declared in by_dtype else max(by_dtype, key=lambda d: len(by_dtype[d]))
    ranked = sorted(by_dtype.items(), key=lambda item: len(item[1]))
    seen = [f"{dtype_name(d)}: {name}" for d, names in ranked for name in grouped(names)]
    device = next((r.device for r in inv.tensors if r.device), "cpu").split(":")[0]
    return [MIXED_FROZEN_DTYPES.found(
        title="The frozen base holds " + ", ".join(f"{dtype_name(d)} ({len(n)})" for d, n in ranked) + " parameters",
        seen=seen,
        why="A module returns its parameters' dtype: a float32 norm hands float32 activations to a half-precision "
            "layer, and outside torch.autocast the matmul stops with 'expected m1 and m2 to have the same dtype' "
            "(or 'expected scalar type Float but found BFloat16'). Training under autocast hides it, so it shows in "
            "generate() or evaluation run without autocast. TRL's QLoRA preparation and hand-made upcasts leave "
            "such mixes.",
        fix=f"with torch.autocast(device_type=\"{device}\", dtype=torch.{dtype_name(target)}):  # as Trainer(bf16=True)\n"
            "    output = model.generate(**inputs)\n"
            f"# or put the frozen base in one dtype:\n{cast_frozen_fix(target)}")]


@check(NON_FINITE_BASE)
def check_non_finite_base(inv: Inventory) -> list[Finding]:
    state = _state(inv)
    if state is None or not state.non_finite:
        return []
    return [NON_FINITE_BASE.found(
        title=f"{len(state.non_finite)} base weights hold inf or nan", seen=state.non_finite,
        why="A weight with inf or nan makes every output it touches nan. Most often a merge overflowed: in float16 "
            "a weight plus a large adapter delta exceeds 65504 (PEFT merges without a check unless safe_merge=True); "
            "or the checkpoint itself is damaged.",
        fix="base_model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16)  # reload: same range as float32\n"
            "model = loracast.PeftModel.from_pretrained(base_model, adapter_path)\n"
            "model.merge_adapter(safe_merge=True)  # refuses a merge that makes inf or nan, weights untouched")]
