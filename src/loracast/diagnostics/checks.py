"""The doctor's checks: each reads an `Inventory` and returns `Finding`s with a stable id.

| id | severity | what |
|---|---|---|
| no-adapters | info | a live model without LoRA layers |
| mixed-adapter-dtypes | warning | one adapter's LoRA tensors in more than one dtype |
| mixed-lora-compute | warning | one adapter's LoRA Linear layers compute in different modes (exact and fast) |
| fp16-trainable | error | float16 parameters that require grad |
| quant-compute-mismatch | warning | adapter dtype != a quantized layer's compute dtype, autocast off |
| fsdp-integer-storage | error | FSDP in use or requested, integer-stored (quantized) weights |
| fsdp-storage-dtype | error | FSDP, float quant storage != the model dtype |
| fsdp-mixed-dtypes | warning | FSDP, adapters in a dtype other than the model's |
| fsdp1-flatten | error (warning when assumed) | FSDP1 as accelerate would wrap it cannot flatten some units |
| base-requires-grad | warning | base weights that require grad |
| non-finite-adapter | error | inf or nan in adapter tensors |
| near-fp16-limit | warning | adapter values within 16x of float16's largest value |
| saved-dtype-differs | warning/info | the file's dtype differs from the dtype trained in |
| environment-changed | warning | versions, device, base dtypes or quantization differ from save time |
| adapter-dtype-changed | warning/info | the adapter now computes in another dtype than at save |
| unsupported-peft-options | error (warning on a live PEFT model) | PEFT options that change the math, loracast lacks |
| unknown-peft-fields | warning | config fields loracast does not know (newer PEFT) |
| adapter-load-failed | error | the adapter does not load into the given base |
| no-fingerprint | info | a saved adapter without a loracast fingerprint |
| fingerprint-unreadable | warning | a damaged fingerprint |

The FSDP checks (fsdp-*) are in `checks_fsdp`, the checks on the frozen base in `checks_base`,
those on files without a fingerprint in `checks_files`; `CHECKS` runs them all.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import fields

import torch

from loracast.config import LoraConfig, unsupported_options
from loracast.diagnostics.checks_base import BASE_CHECKS
from loracast.diagnostics.checks_files import FILE_CHECKS, keep_dtypes_fix
from loracast.diagnostics.checks_fsdp import check_fsdp, check_fsdp1_flatten
from loracast.diagnostics.inputs import Inventory, TensorRecord
from loracast.diagnostics.report import Finding
from loracast.diagnostics.report import count as _count
from loracast.dtypes import dtype_name
from loracast.quant.base import compute_dtype_fix

FP16_MAX = torch.finfo(torch.float16).max
NEAR_FP16_FACTOR = 16.0  # headroom below float16's largest value that the LoRA product and merge can eat
_WIDE = (torch.float32, torch.float64)



def _lora(records: list[TensorRecord]) -> list[TensorRecord]:
    return [r for r in records if r.role not in ("copy", "base")]


def check_no_adapters(inv: Inventory) -> list[Finding]:
    if inv.tensors or inv.load_problems or not inv.live or (inv.base_state and inv.base_state.requantized):
        return []  # a merged model has no adapters left: requantized-merge says what became of them
    return [Finding("no-adapters", "info", "No LoRA adapters found", [inv.subject],
                    "The model holds no LoRA layers or modules_to_save copies, so only its base weights are "
                    "summarised.",
                    "model = loracast.get_peft_model(model, loracast.LoraConfig(target_modules=\"all-linear\"))")]


def check_mixed_dtypes(inv: Inventory) -> list[Finding]:
    out = []
    by_adapter: dict[str, dict[torch.dtype, dict[str, list[str]]]] = defaultdict(lambda: defaultdict(dict))
    for r in _lora(inv.tensors):
        by_adapter[r.adapter][r.dtype].setdefault(r.module, []).append(r.role)
    for adapter, by_dtype in by_adapter.items():
        if len(by_dtype) < 2:
            continue
        ranked = sorted(by_dtype.items(), key=lambda item: len(item[1]))
        seen = [f"{dtype_name(d)}: {m} [{','.join(roles)}]" for d, modules in ranked for m, roles in modules.items()]
        target = dtype_name(ranked[-1][0])
        out.append(Finding(
            "mixed-adapter-dtypes", "warning",
            f"Adapter {adapter!r} holds tensors in {len(by_dtype)} dtypes: "
            + ", ".join(f"{dtype_name(d)} ({len(m)} modules)" for d, m in ranked), seen,
            "One adapter computes in different precisions in different places: layers with half-precision tensors "
            "round the updates and the LoRA branch differently from the rest, FSDP cannot flatten them together, "
            "and it usually means part of the model was cast by hand after the adapter was made (model.half(), a "
            "partial .to(), or adapters added or loaded with different dtype settings).",
            f"for name, param in model.named_parameters():\n"
            f"    if \".lora_\" in name:\n"
            f"        param.data = param.data.to(torch.{target})\n"
            "# or make/load the adapter with one policy: precision=\"stable\" (float32) or \"fast\" (base dtype)"))
    return out


def check_mixed_lora_compute(inv: Inventory) -> list[Finding]:
    out = []
    for adapter, plan in inv.plans.items():
        if plan.get("lora_compute") != "mixed":
            continue
        fast = plan.get("fast_layers") or []
        out.append(Finding(
            "mixed-lora-compute", "warning",
            f"Adapter {adapter!r} computes its LoRA branch \"fast\" in {_count(len(fast), 'layer')} and \"exact\" "
            "in the others", [f"fast: {path}" for path in fast],
            "The compute mode belongs to a layer, not to an adapter: layers this adapter shares with one made "
            "with precision=\"mixed\", or layers switched by set_lora_compute, run its branch in the activation "
            "dtype while the rest run it in the adapter dtype, so its outputs are neither the exact nor the fast "
            "ones its policy promises.",
            f"loracast.set_lora_compute(model, \"exact\", adapter_name={adapter!r})  # or \"fast\" for all its layers"))
    return out


def check_fp16_trainable(inv: Inventory) -> list[Finding]:
    seen = [r.name for r in inv.tensors if r.requires_grad and r.dtype == torch.float16]
    seen += [name for name, dtype in inv.base_grad if dtype == torch.float16]
    if not seen:
        return []
    return [Finding(
        "fp16-trainable", "error", f"{_count(len(seen), 'float16 parameter')} being trained", seen,
        "float16's largest value is 65504 and it keeps 11 significant bits: gradients and optimizer updates of "
        "float16 weights overflow to inf or round to nothing, and torch.amp's GradScaler (Trainer(fp16=True)) "
        "stops with 'Attempting to unscale FP16 gradients'.",
        "model = loracast.get_peft_model(base_model, config, precision=\"stable\")  # float32 adapters\n"
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


def check_quant_compute(inv: Inventory) -> list[Finding]:
    seen = []
    backends = set()
    for r in _lora(inv.tensors):
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
    return [Finding(
        "quant-compute-mismatch", "warning",
        f"{_count(len(seen), 'quantized layer')} computing in another dtype than the adapter", seen,
        "With autocast_adapter_dtype=False (precision=\"fast\") an adapter on a quantized layer is meant to compute "
        "in the layer's compute dtype. Here the LoRA branch runs in one dtype and the quantized matmul in another: "
        "every forward casts the activations between them, and a float16 side can overflow where bfloat16 would "
        "not. PEFT before 0.18 left such adapters in float32 or in the storage dtype (peft#2889).",
        "model = loracast.get_peft_model(base_model, config, precision=\"fast\")  # adapters take the compute dtype\n"
        "# or load the base with the compute dtype the adapter was trained in:\n"
        + "\n".join(fix for fix in dict.fromkeys(_COMPUTE_DTYPE_FIXES.get(b.split("-")[0]) or compute_dtype_fix(b)
                                                  for b in sorted(backends)) if fix))]


# How each quantization library sets a layer's compute dtype (for quant-compute-mismatch's fix); a
# backend not listed here says it itself (`loracast.quant.base.compute_dtype_fix`).
_COMPUTE_DTYPE_FIXES = {
    "bitsandbytes": "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)",
    "torchao": "# torchao computes in the dtype the float weights had when quantized:\n"
               "quantize_base(base_model.to(torch.bfloat16), \"int8\")  # loracast.quant.torchao",
}


def check_base_grad(inv: Inventory) -> list[Finding]:
    if not inv.live or not inv.tensors or not inv.base_grad:
        return []
    seen = [f"{name}: {dtype_name(dtype)}" for name, dtype in inv.base_grad]
    return [Finding(
        "base-requires-grad", "warning", f"{_count(len(seen), 'base weight')} requiring grad", seen,
        "They are trained in full, with gradients and optimizer state for each, which defeats LoRA's memory "
        "saving; save_pretrained does not write them, so their training is lost; and FSDP with "
        "use_orig_params=False refuses units that mix trainable and frozen parameters.",
        "for name, param in model.named_parameters():\n"
        "    if \".lora_\" not in name and \".modules_to_save.\" not in name:\n"
        "        param.requires_grad_(False)\n"
        "# to train a whole module on purpose, list it in LoraConfig(modules_to_save=[...])")]


def _max_abs(record: TensorRecord) -> tuple[int, float]:
    values = record.values.detach()
    if values.numel() == 0:
        return 0, 0.0
    values = values.float() if values.dtype not in (torch.float32, torch.float64) else values
    bad = int((~torch.isfinite(values)).sum())
    finite = values[torch.isfinite(values)]
    return bad, float(finite.abs().max()) if finite.numel() else 0.0


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
        out.append(Finding(
            "non-finite-adapter", "error", f"{_count(len(non_finite), 'adapter tensor')} holding inf or nan", non_finite,
            "One inf or nan spreads to every output it touches: the adapter produces nan logits. Training diverged, "
            "or values overflowed when cast to float16 (saved or loaded in it).",
            "# reload a checkpoint saved before the divergence, then train in float32 with a lower learning rate:\n"
            "model = loracast.PeftModel.from_pretrained(base_model, earlier_checkpoint, is_trainable=True,\n"
            "                                           precision=\"stable\")\n"
            "torch.autograd.set_detect_anomaly(True)  # names the first operation that makes a nan"))
    if large:
        out.append(Finding(
            "near-fp16-limit", "warning",
            f"{_count(len(large), 'adapter tensor')} holding values above {limit:.0f} (float16's largest is {FP16_MAX:.0f})",
            large,
            "In float16 the LoRA branch (x @ A.T @ B.T * scaling) and a merge into a float16 base multiply these "
            "values further and overflow to inf. Harmless in float32 or bfloat16, but such values usually mean an "
            "unstable training run.",
            "model = loracast.PeftModel.from_pretrained(base_model, path, precision=\"stable\")  # float32 adapters\n"
            "# and keep the base in bfloat16 or float32 rather than float16"))
    return out


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
    return [Finding("saved-dtype-differs", "warning" if narrowed else "info",
                    f"{_count(len(seen), 'tensor')} saved in another dtype than trained in", seen, why,
                    "model.save_pretrained(path)  # without save_dtype=, each tensor keeps its trained dtype")]


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


def check_fingerprint_differences(inv: Inventory) -> list[Finding]:
    environment, adapter_dtype = [], []
    for adapter, differences in inv.differences.items():
        prefix = f"{adapter}: " if len(inv.differences) > 1 else ""
        for d in differences:
            (adapter_dtype if d.kind == "adapter-dtype" else environment).append((adapter, prefix + str(d), d))
    out = []
    if environment:
        out.append(Finding(
            "environment-changed", "warning",
            f"{_count(len(environment), 'difference')} from the environment the adapter was saved in", [s for _, s, _ in environment],
            "Other library versions, devices, base dtypes or quantization settings change kernels and rounding: "
            "the adapter's outputs will not match those seen at save time exactly (and a different base dtype or "
            "quantization can change them noticeably).", _environment_fix([d for _, _, d in environment])))
    if adapter_dtype:
        explicit = all(inv.plans.get(a, {}).get("explicit") for a, _, _ in adapter_dtype)
        out.append(Finding(
            "adapter-dtype-changed", "info" if explicit else "warning",
            "The adapter computes in another dtype than it was saved from", [s for _, s, _ in adapter_dtype],
            "A bfloat16-trained adapter loaded in float32 gives slightly different outputs (its branch is no "
            "longer rounded to bfloat16); the reverse rounds the trained values."
            + (" The dtypes were chosen explicitly at load." if explicit else ""),
            "model = loracast.PeftModel.from_pretrained(base_model, path, precision=\"match-training\")"))
    return out


_KNOWN_FIELDS = {f.name for f in fields(LoraConfig)} - {"extra_fields"} | {"runtime_config"}


def check_config(inv: Inventory) -> list[Finding]:
    unsupported, unknown = [], []
    for adapter, config in inv.configs.items():
        unsupported += [f"{adapter}: {k}={v!r}" for k, v in unsupported_options(config).items()]
        unknown += [f"{adapter}: {k}={config[k]!r}" for k in sorted(set(config) - _KNOWN_FIELDS)]
    out = []
    if unsupported:
        out.append(Finding(
            # in a live PEFT model they work (in PEFT); loracast could not load the saved adapter
            "unsupported-peft-options", "warning" if inv.peft_model else "error",
            f"{_count(len(unsupported), 'PEFT option')} changing the math, not implemented by loracast", unsupported,
            "These options change how the adapter computes its output (DoRA rescales each weight row by a learned "
            "magnitude; PiSSA/OLoRA/LoftQ initialisations change the base weights; ...). loracast refuses to load "
            "such an adapter rather than compute something else.",
            "from peft import PeftModel  # PEFT implements these options\n"
            "model = PeftModel.from_pretrained(base_model, path)"))
    if unknown:
        out.append(Finding(
            "unknown-peft-fields", "warning", f"{_count(len(unknown), 'config field')} unknown to loracast", unknown,
            "They come from a newer PEFT. loracast keeps them when it re-saves the config but does not act on them; "
            "if one changes the math, the loaded adapter computes something else than it did in training.",
            "pip install --upgrade loracast  # or load with the PEFT version that wrote the adapter"))
    return out


def check_loading(inv: Inventory) -> list[Finding]:
    out = []
    failed = [f"{name}: {why}" for name, why in inv.load_problems.items()
              if not unsupported_options(inv.configs.get(name, {}))]
    if failed:
        out.append(Finding(
            "adapter-load-failed", "error", "The adapter does not load into the given base model", failed,
            "PeftModel.from_pretrained would raise the same error: the adapter was saved for another base model, "
            "config or rank, or its files are incomplete.",
            "# pass the base model the adapter was trained on (its name is in adapter_config.json:\n"
            "# base_model_name_or_path), loaded as it was at training time"))
    missing = [name for name, fp in inv.fingerprints.items() if fp is None and name not in inv.fingerprint_problems]
    if missing:
        out.append(Finding(
            "no-fingerprint", "info",
            "No precision fingerprint: the adapter was saved by PEFT or another tool", missing,
            "The dtypes it was trained in and the environment it was saved in are unknown, so they cannot be "
            "compared; the file's own dtypes are shown, and are the best record of the training dtype (PEFT writes "
            "tensors as they were in memory). Re-saving must keep them: loaded with the defaults, a bfloat16 file "
            "becomes float32 adapters and would be written back as float32.",
            keep_dtypes_fix(inv, missing[0])))
    if inv.fingerprint_problems:
        out.append(Finding(
            "fingerprint-unreadable", "warning", "The precision fingerprint cannot be read",
            [f"{name}: {why}" for name, why in inv.fingerprint_problems.items()],
            "The file's metadata was damaged or edited; loading works but skips the precision comparison.",
            "model.save_pretrained(path)  # from the model that made the adapter, to write a fresh fingerprint"))
    return out


CHECKS: list[Callable[[Inventory], list[Finding]]] = [
    check_no_adapters, check_mixed_dtypes, check_mixed_lora_compute, check_fp16_trainable, check_quant_compute,
    check_fsdp, check_fsdp1_flatten, check_base_grad, check_values, check_saved_dtype, check_fingerprint_differences,
    check_config, check_loading, *BASE_CHECKS, *FILE_CHECKS,
]


def run_checks(inventory: Inventory) -> list[Finding]:
    """Every finding of every check, in check order."""
    found: list[Finding] = []
    for check in CHECKS:
        found += check(inventory)
    return found
