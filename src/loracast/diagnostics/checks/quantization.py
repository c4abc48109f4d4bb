"""Checks on adapters over quantized layers: the dtype they compute in against the layer's, and
merges rounded to the quantization grid."""

from __future__ import annotations

import torch

from loracast.diagnostics.checks.adapters import lora_records
from loracast.diagnostics.checks.registry import check, finding_kind
from loracast.diagnostics.checks.words import count, grouped
from loracast.diagnostics.inputs import Inventory
from loracast.diagnostics.report import Finding
from loracast.dtypes import dtype_name
from loracast.quant.base import compute_dtype_fix

__all__ = [
    "QUANT_COMPUTE_MISMATCH", "QUANT_NO_COMPUTE_DTYPE", "REQUANTIZED_MERGE", "check_quant_compute",
    "check_quant_no_compute", "check_requantized",
]

_WIDE = (torch.float32, torch.float64)

QUANT_COMPUTE_MISMATCH = finding_kind(
    "quant-compute-mismatch", "warning",
    title="the adapter dtype differs from a quantized layer's compute dtype with autocast off",
    explanation="Every forward casts between the two, and a float16 side can overflow where bfloat16 would not.")
QUANT_NO_COMPUTE_DTYPE = finding_kind(
    "quant-no-compute-dtype", "warning",
    title="float32 adapters on 8-bit layers, which have no compute dtype",
    explanation="PEFT ignores autocast_adapter_dtype=False there and records no flag, so on PEFT models the "
                "doctor cannot tell whether float32 was asked for.",
    other_severity="info", other_when="on a PEFT model")
REQUANTIZED_MERGE = finding_kind(
    "requantized-merge", "warning",
    title="quantized layers hold a merged adapter (the merge leaves a record on the layer that outlives "
          "merge_and_unload; PEFT's merge leaves none)",
    explanation="The merge was rounded to the 4-bit or 8-bit grid: part of what training learned is lost and "
                "outputs differ from the unmerged model's.")

# How each quantization library sets a layer's compute dtype (for quant-compute-mismatch's fix); a
# backend not listed here says it itself (`loracast.quant.base.compute_dtype_fix`).
_COMPUTE_DTYPE_FIXES = {
    "bitsandbytes": "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)",
    "torchao": "# torchao computes in the dtype the float weights had when quantized:\n"
               "quantize_base(base_model.to(torch.bfloat16), \"int8\")  # loracast.quant.torchao",
}


@check(QUANT_COMPUTE_MISMATCH)
def check_quant_compute(inv: Inventory) -> list[Finding]:
    seen = []
    backends = set()
    for r in lora_records(inv.tensors):
        base = inv.base_layers.get(r.module)
        if base is None or base.backend is None or base.compute is None or r.dtype == base.compute:
            continue
        autocast = inv.plans.get(r.adapter, {}).get("autocast_adapter_dtype")
        if r.dtype in _WIDE and autocast is not False:
            continue  # float32 adapters by choice (autocast on): the stable set-up
        seen.append(f"{r.module} [{r.adapter}]: adapter {dtype_name(r.dtype)}, compute {dtype_name(base.compute)}")
        backends.add(base.backend)
    seen = list(dict.fromkeys(seen))
    if not seen:
        return []
    return [QUANT_COMPUTE_MISMATCH.found(
        title=f"{count(len(seen), 'quantized layer')} computing in another dtype than the adapter", seen=seen,
        why="With autocast_adapter_dtype=False (precision=\"fast\") an adapter on a quantized layer is meant to "
            "compute in the layer's compute dtype. Here the LoRA branch runs in one dtype and the quantized matmul "
            "in another: every forward casts the activations between them, and a float16 side can overflow where "
            "bfloat16 would not. PEFT before 0.18 left such adapters in float32 or in the storage dtype (peft#2889).",
        fix="model = loracast.get_peft_model(base_model, config, precision=\"fast\")  # adapters take the compute dtype\n"
            "# or load the base with the compute dtype the adapter was trained in:\n"
            + "\n".join(fix for fix in dict.fromkeys(_COMPUTE_DTYPE_FIXES.get(b.split("-")[0]) or compute_dtype_fix(b)
                                                      for b in sorted(backends)) if fix))]


@check(QUANT_NO_COMPUTE_DTYPE)
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
    return [QUANT_NO_COMPUTE_DTYPE.found(
        severity="info" if inv.peft_model else "warning",
        title=f"{len(seen)} adapters in float32 on quantized layers that have no compute dtype", seen=grouped(seen),
        why="An 8-bit (LLM.int8) layer stores int8 and records no float compute dtype, so 'the base dtype' that "
            "autocast_adapter_dtype=False asks for cannot be read from it: PEFT keeps such adapters in float32 "
            "(peft#2889, its 8-bit test is an expected failure), and loracast falls back to the model's declared "
            "dtype, or float32 when the model declares none." + peft_note,
        fix=f"model = loracast.get_peft_model(base_model, config, adapter_dtype=torch.{target})\n"
            "# or, on an existing model:\n"
            "for name, param in model.named_parameters():\n"
            "    if \".lora_\" in name:\n"
            f"        param.data = param.data.to(torch.{target})")]


@check(REQUANTIZED_MERGE)
def check_requantized(inv: Inventory) -> list[Finding]:
    state = inv.base_state if inv.live else None
    if state is None or not state.requantized:
        return []
    seen = [f"{path}: max |error| {r.max_abs:.3g}, rms {r.rms:.3g} against an rms adapter delta of {r.delta_rms:.3g}"
            for path, r in state.requantized.items()]
    return [REQUANTIZED_MERGE.found(
        title=f"{len(seen)} quantized layers hold a merged adapter, rounded to the quantization grid", seen=seen,
        why="Merging into a quantized weight dequantizes it, adds the adapter's delta and quantizes the sum again: "
            "the 4-bit or 8-bit grid is much coarser than most deltas, so part of what training learned is rounded "
            "away and the merged model's outputs differ from the unmerged one's (peft#2032). merge_and_unload keeps "
            "no way back.",
        fix="# keep the adapter unmerged on the quantized base: outputs as in training\n"
            "model = loracast.PeftModel.from_pretrained(quantized_base, adapter_path)\n"
            "# or, to export a merged model, merge into the base loaded without quantization:\n"
            "base = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16)\n"
            "merged = loracast.PeftModel.from_pretrained(base, adapter_path).merge_and_unload()")]
