"""The doctor's checks on a live model's frozen base (read by `base_state`), its quantized layers,
and the dtype its adapters are trained in.

| id | severity | what |
|---|---|---|
| upcast-frozen-params | warning | frozen non-norm parameters in float32 in a model that declares a half dtype |
| mixed-frozen-dtypes | warning | frozen unquantized base parameters in several float dtypes |
| requantized-merge | warning | quantized layers hold a merge, rounded to the quantization grid |
| quant-no-compute-dtype | warning (info on PEFT models) | float32 adapters on quantized layers without a compute dtype |
| non-finite-base | error | inf or nan in base weights |
| bf16-trainable | warning | bfloat16 adapter tensors trained, not chosen with a loracast policy |
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import torch

from loracast.diagnostics.base_state import BaseState, FrozenParam
from loracast.diagnostics.inputs import Inventory
from loracast.diagnostics.report import Finding
from loracast.dtypes import dtype_name

_HALF = (torch.float16, torch.bfloat16)
_INDEX = re.compile(r"\.\d+\.")


def grouped(names: list[str]) -> list[str]:
    """Names that differ only by a layer index, listed once: 'model.layers.*.mlp.weight (x24)'."""
    counts = Counter(_INDEX.sub(".*.", name) for name in names)
    return [name if n == 1 else f"{name} (x{n})" for name, n in counts.items()]


def size(nbytes: int) -> str:
    """'3.2 MiB', '48 KiB', '512 bytes'."""
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.1f} MiB"
    return f"{nbytes / 1024:.0f} KiB" if nbytes >= 1024 else f"{nbytes} bytes"


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


def check_upcast_frozen(inv: Inventory) -> list[Finding]:
    state = _state(inv)
    if state is None or state.declared not in _HALF:
        return []
    upcast = [p for p in state.frozen if p.dtype == torch.float32 and not p.is_norm]
    if not upcast:
        return []
    half = torch.finfo(state.declared).bits // 8
    extra = sum(p.numel for p in upcast) * (4 - half)
    norms = sum(1 for p in state.frozen if p.dtype == torch.float32 and p.is_norm)
    declared = dtype_name(state.declared)
    return [Finding(
        "upcast-frozen-params", "warning",
        f"{len(upcast)} frozen base parameters are float32 in a {declared} model: "
        f"{size(extra)} more than in {declared}",
        grouped([p.name for p in upcast]),
        "prepare_model_for_kbit_training (PEFT's, or loracast's with upcast=\"all\") casts every frozen "
        "half-precision parameter that is not quantized to float32: embeddings, lm_head, biases, unquantized "
        "layers, and the whole model when it was not quantized. Frozen weights gain nothing from float32 but "
        "memory; on a large vocabulary the float32 embedding and head can outweigh the 4-bit layers."
        + (f" ({norms} float32 norm parameters are left out: they are small.)" if norms else ""),
        f"{cast_frozen_fix(state.declared)}\n"
        "# or, before training: model = loracast.prepare_model_for_kbit_training(model, upcast=\"none\")\n"
        "# (upcast=\"norms\" keeps float32 norms, which then need torch.autocast: see mixed-frozen-dtypes)")]


def _by_dtype(frozen: list[FrozenParam]) -> dict[torch.dtype, list[str]]:
    found: dict[torch.dtype, list[str]] = defaultdict(list)
    for p in frozen:
        found[p.dtype].append(p.name)
    return found


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
    return [Finding(
        "mixed-frozen-dtypes", "warning",
        "The frozen base holds " + ", ".join(f"{dtype_name(d)} ({len(n)})" for d, n in ranked) + " parameters",
        seen,
        "A module returns its parameters' dtype: a float32 norm hands float32 activations to a half-precision "
        "layer, and outside torch.autocast the matmul stops with 'expected m1 and m2 to have the same dtype' "
        "(or 'expected scalar type Float but found BFloat16'). Training under autocast hides it, so it shows in "
        "generate() or evaluation run without autocast. TRL's QLoRA preparation and hand-made upcasts leave "
        "such mixes.",
        f"with torch.autocast(device_type=\"{device}\", dtype=torch.{dtype_name(target)}):  # as Trainer(bf16=True)\n"
        "    output = model.generate(**inputs)\n"
        f"# or put the frozen base in one dtype:\n{cast_frozen_fix(target)}")]


def check_requantized(inv: Inventory) -> list[Finding]:
    state = _state(inv)
    if state is None or not state.requantized:
        return []
    seen = [f"{path}: max |error| {r.max_abs:.3g}, rms {r.rms:.3g} against an rms adapter delta of {r.delta_rms:.3g}"
            for path, r in state.requantized.items()]
    return [Finding(
        "requantized-merge", "warning",
        f"{len(seen)} quantized layers hold a merged adapter, rounded to the quantization grid", seen,
        "Merging into a quantized weight dequantizes it, adds the adapter's delta and quantizes the sum again: "
        "the 4-bit or 8-bit grid is much coarser than most deltas, so part of what training learned is rounded "
        "away and the merged model's outputs differ from the unmerged one's (peft#2032). merge_and_unload keeps "
        "no way back.",
        "# keep the adapter unmerged on the quantized base: outputs as in training\n"
        "model = loracast.PeftModel.from_pretrained(quantized_base, adapter_path)\n"
        "# or, to export a merged model, merge into the base loaded without quantization:\n"
        "base = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16)\n"
        "merged = loracast.PeftModel.from_pretrained(base, adapter_path).merge_and_unload()")]


def check_quant_no_compute(inv: Inventory) -> list[Finding]:
    if not inv.live:
        return []
    seen, adapters = [], set()
    for r in inv.tensors:
        base = inv.base_layers.get(r.module)
        if r.role in ("copy", "base") or base is None or base.backend is None or base.compute is not None:
            continue
        if r.dtype == torch.float32 and (inv.peft_model or inv.plans.get(r.adapter, {}).get("autocast_adapter_dtype") is False):
            seen.append(f"{r.module} [{r.adapter}]: adapter float32, storage {dtype_name(base.storage)}")
            adapters.add(r.adapter)
    seen = list(dict.fromkeys(seen))
    if not seen:
        return []
    declared = inv.base_state.declared if inv.base_state is not None else None
    target = dtype_name(declared or torch.bfloat16)
    peft_note = (" PEFT records no autocast_adapter_dtype flag, so the doctor cannot tell whether float32 was "
                 "asked for: if you passed autocast_adapter_dtype=False, PEFT ignored it here.") if inv.peft_model else ""
    return [Finding(
        "quant-no-compute-dtype", "info" if inv.peft_model else "warning",
        f"{len(seen)} adapters in float32 on quantized layers that have no compute dtype", grouped(seen),
        "An 8-bit (LLM.int8) layer stores int8 and records no float compute dtype, so 'the base dtype' that "
        "autocast_adapter_dtype=False asks for cannot be read from it: PEFT keeps such adapters in float32 "
        "(peft#2889, its 8-bit test is an expected failure), and loracast falls back to the model's declared "
        "dtype, or float32 when the model declares none." + peft_note,
        f"model = loracast.get_peft_model(base_model, config, adapter_dtype=torch.{target})\n"
        "# or, on an existing model:\n"
        "for name, param in model.named_parameters():\n"
        "    if \".lora_\" in name:\n"
        f"        param.data = param.data.to(torch.{target})")]


def check_non_finite_base(inv: Inventory) -> list[Finding]:
    state = _state(inv)
    if state is None or not state.non_finite:
        return []
    return [Finding(
        "non-finite-base", "error", f"{len(state.non_finite)} base weights hold inf or nan", state.non_finite,
        "A weight with inf or nan makes every output it touches nan. Most often a merge overflowed: in float16 "
        "a weight plus a large adapter delta exceeds 65504 (PEFT merges without a check unless safe_merge=True); "
        "or the checkpoint itself is damaged.",
        "base_model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16)  # reload: same range as float32\n"
        "model = loracast.PeftModel.from_pretrained(base_model, adapter_path)\n"
        "model.merge_adapter(safe_merge=True)  # refuses a merge that makes inf or nan, weights untouched")]


def check_bf16_trainable(inv: Inventory) -> list[Finding]:
    if not inv.live:
        return []
    # bfloat16 chosen with precision="fast"/"fsdp" or adapter_dtype= is a decision, not a surprise
    found = [r for r in inv.tensors if r.requires_grad and r.dtype == torch.bfloat16 and r.role != "base"
             and inv.plans.get(r.adapter, {}).get("policy") not in ("fast", "fsdp", "custom")]
    if not found:
        return []
    return [Finding(
        "bf16-trainable", "warning",
        f"{len(found)} bfloat16 adapter tensors being trained", grouped([r.name for r in found]),
        "bfloat16 keeps 8 significant bits: an optimizer update smaller than half the spacing around a weight "
        "(about 0.4% of its size) is rounded away, so with small learning rates, or late in a decaying schedule, "
        "the adapter stops learning while the loss looks merely flat (keras-team/keras-hub#2629; loracast "
        "train --compare-precision measures it). Common causes: model.to(torch.bfloat16) after get_peft_model, "
        "or autocast_adapter_dtype=False.",
        "model = loracast.get_peft_model(base_model, config, precision=\"stable\")  # float32 adapters\n"
        "# (precision=\"mixed\" keeps float32 weights and computes the branch in bfloat16, for speed)\n"
        "# or, on an existing model:\n"
        "for param in model.parameters():\n"
        "    if param.requires_grad and param.dtype == torch.bfloat16:\n"
        "        param.data = param.data.float()\n"
        "        param.grad = None\n"
        "# then create the optimizer again")]


BASE_CHECKS = [check_bf16_trainable, check_upcast_frozen, check_mixed_frozen, check_requantized, check_quant_no_compute,
               check_non_finite_base]
