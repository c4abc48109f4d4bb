"""Checks for FSDP: what FSDP1 cannot flatten (integer or mixed-dtype quantized storage, adapters
in another dtype than the base, units mixing trainable and frozen parameters).

They run when FSDP is in use or asked for (`--fsdp`, ``fsdp=True``, accelerate's
``ACCELERATE_USE_FSDP``, the "fsdp" policy). Every fix names the FSDP1 setting it needs: with
use_orig_params=False a unit must also be all trainable or all frozen.
"""

from __future__ import annotations

import torch

from loracast.diagnostics.checks.registry import check, finding_kind
from loracast.diagnostics.checks.words import count
from loracast.diagnostics.inputs import Inventory
from loracast.diagnostics.report import Finding
from loracast.distributed.accelerate_env import accelerate_fsdp_launched
from loracast.dtypes import dtype_name

__all__ = ["FSDP1_FLATTEN", "FSDP_INTEGER_STORAGE", "FSDP_MIXED_DTYPES", "FSDP_STORAGE_DTYPE", "check_fsdp", "check_fsdp1_flatten"]

FSDP_INTEGER_STORAGE = finding_kind(
    "fsdp-integer-storage", "error", title="FSDP in use or asked for, and quantized weights stored as integers",
    explanation="Wrapping fails with 'Cannot flatten integer dtype tensors'; a float quant_storage equal to the "
                "model dtype packs the same values into tensors FSDP can shard.")
FSDP_STORAGE_DTYPE = finding_kind(
    "fsdp-storage-dtype", "error",
    title="FSDP in use or asked for, and quantized weights stored in a float dtype other than the model's",
    explanation="Every parameter of an FSDP unit must share one dtype ('Must flatten tensors with uniform dtype').")
FSDP_MIXED_DTYPES = finding_kind(
    "fsdp-mixed-dtypes", "warning", title="FSDP, and adapters in another dtype than the base",
    explanation="An FSDP1 unit holding both fails to flatten; the fix names the FSDP1 wrap it needs "
                "(fsdp1_auto_wrap_policy or use_orig_params=True).")
FSDP1_FLATTEN = finding_kind(
    "fsdp1-flatten", "error", title="FSDP1 as accelerate would wrap the model cannot flatten some units",
    explanation="Wrapping fails before the first step with 'Must flatten tensors with uniform dtype' "
                "(or '... uniform requires_grad').",
    other_severity="warning", other_when="no accelerate FSDP launch was found, so its defaults are assumed")


def _storage_fix(inv: Inventory) -> str:
    dtype = dtype_name(inv.model_dtype or torch.bfloat16)
    return ("model = AutoModelForCausalLM.from_pretrained(\n"
            f"    name, dtype=torch.{dtype},\n"
            f"    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage=torch.{dtype}))\n"
            "model = loracast.get_peft_model(model, config, precision=\"fsdp\")\n"
            + _FSDP1_WRAP)


# Frozen base and trainable adapters in one FSDP1 unit also fail with use_orig_params=False.
_FSDP1_WRAP = ("# FSDP1 with use_orig_params=False also needs one requires_grad per unit ('Must flatten tensors with\n"
               "# uniform requires_grad'): give the adapters units of their own, or keep the original parameters\n"
               "model = FullyShardedDataParallel(model, auto_wrap_policy=loracast.distributed.fsdp1_auto_wrap_policy(model))\n"
               "# or FullyShardedDataParallel(model, use_orig_params=True, ...); FSDP2 (fully_shard) needs neither")


@check(FSDP_INTEGER_STORAGE, FSDP_STORAGE_DTYPE, FSDP_MIXED_DTYPES)
def check_fsdp(inv: Inventory) -> list[Finding]:
    if not inv.fsdp_reason:
        return []
    out = []
    quantized = {info.module: info for info in inv.quantized}
    integer = [f"{m}: {dtype_name(i.storage)}" for m, i in quantized.items()
               if i.storage is not None and not i.storage.is_floating_point]
    integer += [f"{name}: {dtype_name(dtype)}" for name, dtype in inv.integer_params
                if not any(name.startswith(m + ".") for m in quantized)]
    if integer:
        out.append(FSDP_INTEGER_STORAGE.found(
            title=f"{inv.fsdp_reason}, but {len(integer)} weights are stored as integers", seen=integer,
            why="FSDP puts the parameters of a wrapped unit into one flat tensor, which must be floating point: "
            "bitsandbytes 4-bit packs its weights in uint8 by default and 8-bit stores int8, so wrapping fails with "
            "'Cannot flatten integer dtype tensors'. A float quant_storage equal to the model dtype packs the same "
            "4-bit values into tensors FSDP can shard.", fix=_storage_fix(inv)))
    model_dtype = inv.model_dtype
    floats = [f"{m}: {dtype_name(i.storage)}" for m, i in quantized.items()
              if i.storage is not None and i.storage.is_floating_point and model_dtype is not None and i.storage != model_dtype]
    if floats:
        out.append(FSDP_STORAGE_DTYPE.found(
            title=f"{inv.fsdp_reason}, but quantized weights are stored in another float dtype than the model's "
                  f"{dtype_name(model_dtype)}", seen=floats,
            why="Every parameter of an FSDP unit must share one dtype ('Must flatten tensors with uniform dtype'): a "
            "bnb_4bit_quant_storage other than the model dtype puts two dtypes into the units holding these layers.",
            fix=_storage_fix(inv)))
    mixed = list(dict.fromkeys(f"{r.module} [{r.adapter}]: {dtype_name(r.dtype)}" for r in inv.tensors
                               if r.role != "base" and model_dtype is not None and r.dtype != model_dtype))
    if mixed and inv.live:
        out.append(FSDP_MIXED_DTYPES.found(
            title=f"{inv.fsdp_reason}, and adapters are in another dtype than the model's {dtype_name(model_dtype)}",
            seen=mixed,
            why="An FSDP1 unit holding both base weights and these adapters fails with 'Must flatten tensors with "
            "uniform dtype', unless the LoRA modules are wrapped in units of their own (FSDP2's fully_shard accepts "
            "mixed dtypes).",
            fix="model = loracast.get_peft_model(base_model, config, precision=\"fsdp\")  # adapters in the model dtype\n"
            + _FSDP1_WRAP + "\n"
            "# the policy alone also lets adapters stay float32: each LoRA module is a unit of one dtype"))
    return out


@check(FSDP1_FLATTEN)
def check_fsdp1_flatten(inv: Inventory) -> list[Finding]:
    if not inv.fsdp1_problems:
        return []
    launched = accelerate_fsdp_launched()
    assumed = "" if launched else " (accelerate's defaults, as no accelerate FSDP launch was found)"
    return [FSDP1_FLATTEN.found(
        severity="error" if launched else "warning",
        title=f"FSDP1 with {inv.fsdp1_setup}{assumed} would fail to flatten {count(len(inv.fsdp1_problems), 'unit')}",
        seen=inv.fsdp1_problems,
        why="FSDP1 flattens the parameters of each unit into one tensor: they must share one float dtype and, with "
        "use_orig_params=False, all be trainable or all frozen. Wrapping fails before the first step with "
        "'Must flatten tensors with uniform dtype' (or '... uniform requires_grad'). The loracast wrap policy gives "
        "the adapters units of their own, so both settings of use_orig_params work and adapters stay float32.",
        fix="from loracast.distributed import fsdp1_auto_wrap_policy\n"
        "plugin = FullyShardedDataParallelPlugin(fsdp_version=1, auto_wrap_policy=fsdp1_auto_wrap_policy(model))\n"
        "# or FullyShardedDataParallel(model, auto_wrap_policy=fsdp1_auto_wrap_policy(model), ...)\n"
        "# or FSDP2, which shards each tensor on its own: loracast.distributed.shard_model(model)")]
