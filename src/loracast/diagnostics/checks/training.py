"""Checks on what is being trained: half-precision adapters that require grad, and base weights
that require grad."""

from __future__ import annotations

import torch

from loracast.diagnostics.checks.registry import check, finding_kind
from loracast.diagnostics.checks.words import count, grouped
from loracast.diagnostics.inputs import Inventory
from loracast.diagnostics.report import Finding
from loracast.dtypes import dtype_name

__all__ = ["BASE_REQUIRES_GRAD", "BF16_TRAINABLE", "FP16_TRAINABLE", "check_base_grad", "check_bf16_trainable", "check_fp16_trainable"]

FP16_TRAINABLE = finding_kind(
    "fp16-trainable", "error", title="float16 parameters require grad",
    explanation="Gradients and updates overflow or round to nothing, and torch.amp's GradScaler stops with "
                "'Attempting to unscale FP16 gradients'; on a PEFT model with modules_to_save the fix also says to "
                "run under autocast (PEFT's copy does not cast its input).")
BF16_TRAINABLE = finding_kind(
    "bf16-trainable", "warning",
    title="bfloat16 adapters trained without a loracast policy choosing them (model.to(bf16) after get_peft_model)",
    explanation="bfloat16 keeps 8 significant bits: small updates round away and the loss looks merely flat.")
BASE_REQUIRES_GRAD = finding_kind(
    "base-requires-grad", "warning",
    title="base weights require grad (trained biases of bias=\"all\"/\"lora_only\" excepted)",
    explanation="They are trained in full but not saved with the adapter, and FSDP1 with use_orig_params=False "
                "refuses units mixing trainable and frozen parameters.")


@check(FP16_TRAINABLE)
def check_fp16_trainable(inv: Inventory) -> list[Finding]:
    seen = [r.name for r in inv.tensors if r.requires_grad and r.dtype == torch.float16]
    seen += [name for name, dtype in inv.base_grad if dtype == torch.float16]
    if not seen:
        return []
    return [FP16_TRAINABLE.found(
        title=f"{count(len(seen), 'float16 parameter')} being trained", seen=seen,
        why="float16's largest value is 65504 and it keeps 11 significant bits: gradients and optimizer updates of "
            "float16 weights overflow to inf or round to nothing, and torch.amp's GradScaler (Trainer(fp16=True)) "
            "stops with 'Attempting to unscale FP16 gradients'.",
        fix="model = loracast.get_peft_model(base_model, config, precision=\"stable\")  # float32 adapters\n"
            "# or, on an existing model (the frozen base may stay float16):\n"
            "for param in model.parameters():\n"
            "    if param.requires_grad:\n"
            "        param.data = param.data.float()\n"
            "        param.grad = None  # a float16 grad left by an earlier step would still fail to unscale\n"
            "# then create the optimizer again: its state was made for the float16 tensors"
            + _peft_copy_note(inv))]


def _peft_copy_note(inv: Inventory) -> str:
    """PEFT's modules_to_save copies do not cast their input: once float32, they need autocast."""
    copies = [r for r in inv.tensors if r.role == "copy" and r.requires_grad and r.dtype == torch.float16]
    if not (inv.peft_model and copies):
        return ""
    device = (copies[0].device or "cpu").split(":")[0]
    return ("\n# PEFT's modules_to_save copies do not cast their input: run forward passes under autocast,\n"
            "# as Trainer(fp16=True) does, or they receive float16 activations ('expected m1 and m2 to have\n"
            "# the same dtype'):\n"
            f"with torch.autocast(device_type=\"{device}\", dtype=torch.float16):\n"
            "    loss = model(**batch).loss")


@check(BF16_TRAINABLE)
def check_bf16_trainable(inv: Inventory) -> list[Finding]:
    if not inv.live:
        return []
    # bfloat16 chosen with precision="fast"/"fsdp" or adapter_dtype= is a decision, not a surprise
    found = [r for r in inv.tensors if r.requires_grad and r.dtype == torch.bfloat16 and r.role != "base"
             and inv.plans.get(r.adapter, {}).get("policy") not in ("fast", "fsdp", "custom")]
    if not found:
        return []
    return [BF16_TRAINABLE.found(
        title=f"{len(found)} bfloat16 adapter tensors being trained", seen=grouped([r.name for r in found]),
        why="bfloat16 keeps 8 significant bits: an optimizer update smaller than half the spacing around a weight "
            "(about 0.4% of its size) is rounded away, so with small learning rates, or late in a decaying "
            "schedule, the adapter stops learning while the loss looks merely flat (keras-team/keras-hub#2629; "
            "loracast train --compare-precision measures it). Common causes: model.to(torch.bfloat16) after "
            "get_peft_model, or autocast_adapter_dtype=False.",
        fix="model = loracast.get_peft_model(base_model, config, precision=\"stable\")  # float32 adapters\n"
            "# (precision=\"mixed\" keeps float32 weights and computes the branch in bfloat16, for speed)\n"
            "# or, on an existing model:\n"
            "for param in model.parameters():\n"
            "    if param.requires_grad and param.dtype == torch.bfloat16:\n"
            "        param.data = param.data.float()\n"
            "        param.grad = None\n"
            "# then create the optimizer again")]


@check(BASE_REQUIRES_GRAD)
def check_base_grad(inv: Inventory) -> list[Finding]:
    if not inv.live or not inv.tensors or not inv.base_grad:
        return []
    seen = [f"{name}: {dtype_name(dtype)}" for name, dtype in inv.base_grad]
    return [BASE_REQUIRES_GRAD.found(
        title=f"{count(len(seen), 'base weight')} requiring grad", seen=seen,
        why="They are trained in full, with gradients and optimizer state for each, which defeats LoRA's memory "
            "saving; save_pretrained does not write them, so their training is lost; and FSDP with "
            "use_orig_params=False refuses units that mix trainable and frozen parameters.",
        fix="for name, param in model.named_parameters():\n"
            "    if \".lora_\" not in name and \".modules_to_save.\" not in name:\n"
            "        param.requires_grad_(False)\n"
            "# to train a whole module on purpose, list it in LoraConfig(modules_to_save=[...])")]
