"""The benchmark cases. Each runs one library ("peft" or "loracast") in the current process and
returns plain numbers (seconds, bytes, counts); `run.py` starts one fresh process per case and
library and compares them.

Variants: PEFT runs its only computation ("peft"); loracast runs both compute modes on the same
model ("exact": PEFT's arithmetic bit for bit, the default; "fast": the LoRA branch in the
activation dtype, see `loracast.set_lora_compute`). Where a case has a lower bound (the frozen
base model), the bound runs in the same process, interleaved with the variants.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import warnings

import torch

from harness import interleave, peak_rss_of, time_each
from models import Size, build_llama, deep_template, fresh_copy, meta_llama, token_ids

PRECISIONS = {  # case name -> (base dtype, adapter dtype)
    "bf16_fp32": (torch.bfloat16, torch.float32),
    "bf16_bf16": (torch.bfloat16, torch.bfloat16),
    "fp32_fp32": (torch.float32, torch.float32),
}


def quiet() -> None:
    """Silence library warnings and log lines that would flood a benchmark's output."""
    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def library(impl: str):
    """The library under test: `peft` or `loracast` (same API)."""
    if impl not in ("peft", "loracast"):
        raise ValueError(f"impl {impl!r} is not benchmarked; use 'peft' or 'loracast'")
    return importlib.import_module(impl)


def lora_config(lib, size: Size, **extra):
    """LoRA r=16 (alpha 32) on every linear layer, no dropout: the same for both libraries."""
    return lib.LoraConfig(r=size.rank, lora_alpha=size.alpha, target_modules="all-linear", lora_dropout=0.0, **extra)


def modes(impl: str) -> list[str]:
    """The variants a library runs: PEFT's one computation, or loracast's two compute modes."""
    return ["peft"] if impl == "peft" else ["exact", "fast"]


def use_mode(lib, model, mode: str) -> None:
    """Switch a loracast model to compute mode `mode` (PEFT has only one)."""
    if mode != "peft":
        lib.set_lora_compute(model, mode)


def lora_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) for every LoRA Linear of either library (both name their parts alike)."""
    return [(name, module) for name, module in model.named_modules()
            if hasattr(module, "base_layer") and hasattr(module, "lora_A") and "default" in module.lora_A]


def _adapter_dtype(model) -> torch.dtype:
    dtypes = {p.dtype for name, p in model.named_parameters() if "lora_" in name}
    if len(dtypes) != 1:
        raise RuntimeError(f"expected one adapter dtype, found {dtypes}")
    return dtypes.pop()


# -- injection and files ------------------------------------------------------------------------

def case_inject_deep(impl: str, size: Size, repeats: int) -> dict:
    """get_peft_model on a deep, narrow Llama (7 targets per layer)."""
    lib = library(impl)
    template = deep_template(size)
    times = time_each(lambda model: lib.get_peft_model(model, lora_config(lib, size)), repeats, warmup=1,
                      prepare=lambda: fresh_copy(template))
    targets = len(lora_modules(lib.get_peft_model(fresh_copy(template), lora_config(lib, size))))
    return {"rows": {"inject": {"times": times}}, "info": {"targets": targets}}


def case_inject_meta(impl: str, size: Size, repeats: int) -> dict:
    """get_peft_model on a 7B-shaped Llama built on the meta device."""
    lib = library(impl)
    times = time_each(lambda model: lib.get_peft_model(model, lora_config(lib, size)), repeats, warmup=1,
                      prepare=lambda: meta_llama(size))
    targets = len(lora_modules(lib.get_peft_model(meta_llama(size), lora_config(lib, size))))
    return {"rows": {"inject": {"times": times}}, "info": {"targets": targets}}


def case_save_load(impl: str, size: Size, repeats: int) -> dict:
    """save_pretrained and PeftModel.from_pretrained of an adapter on every linear of the deep model."""
    lib = library(impl)
    template = deep_template(size)
    model = lib.get_peft_model(fresh_copy(template), lora_config(lib, size, init_lora_weights=False))
    with tempfile.TemporaryDirectory(prefix="loracast-bench-") as tmp:
        folders = iter(os.path.join(tmp, f"save{i}") for i in range(repeats + 2))
        save_times = time_each(lambda: model.save_pretrained(next(folders)), repeats, warmup=1)
        folder = os.path.join(tmp, "save0")
        file_bytes = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
        load_times = time_each(lambda base: lib.PeftModel.from_pretrained(base, folder), repeats, warmup=1,
                               prepare=lambda: fresh_copy(template))
    return {"rows": {"save": {"times": save_times}, "load": {"times": load_times}},
            "info": {"targets": len(lora_modules(model)), "file_bytes": file_bytes}}


# -- training and inference ---------------------------------------------------------------------

def _frozen(model):
    for param in model.parameters():
        param.requires_grad_(False)
    return model.train()


def _train_timings(impl: str, lib, model, bound, ids: torch.Tensor, repeats: int) -> dict:
    """Warm up, measure each variant's step memory, then interleave the variants with the bound."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def bound_step() -> None:  # frozen base: forward + backward to the inputs only
        embeds = bound.get_input_embeddings()(ids).detach().requires_grad_(True)
        bound(inputs_embeds=embeds, labels=ids).loss.backward()

    variants = modes(impl)
    for mode in variants:  # warm-up; creates the optimizer state
        use_mode(lib, model, mode)
        step()
    memory = {}
    for mode in variants:
        use_mode(lib, model, mode)
        memory[mode] = peak_rss_of(step)
    memory["bound"] = peak_rss_of(bound_step)
    plan = {"bound": (None, bound_step)}
    for mode in variants:
        plan[mode] = (lambda mode=mode: use_mode(lib, model, mode), step)
    times = interleave(plan, repeats, warmup=1)
    return {name: {"times": times[name], "peak_rss": memory[name]} for name in plan}


def case_train(impl: str, size: Size, repeats: int, precision: str) -> dict:
    """One AdamW training step (forward, backward, optimizer) against the frozen-base bound."""
    lib = library(impl)
    base_dtype, adapter_dtype = PRECISIONS[precision]
    model = lib.get_peft_model(build_llama(size, base_dtype), lora_config(lib, size),
                               autocast_adapter_dtype=adapter_dtype == torch.float32)
    if _adapter_dtype(model) != adapter_dtype:
        raise RuntimeError(f"{impl} made {_adapter_dtype(model)} adapters, expected {adapter_dtype}")
    bound = _frozen(build_llama(size, base_dtype))
    ids = token_ids(size, size.batch, size.seq)
    rows = _train_timings(impl, lib, model, bound, ids, repeats)
    return {"rows": rows, "info": {"base_dtype": str(base_dtype), "adapter_dtype": str(adapter_dtype),
                                   "tokens": size.batch * size.seq}}


def case_infer(impl: str, size: Size, repeats: int) -> dict:
    """Forward latency of one sequence, bf16 base + fp32 adapters: unmerged, merged, and the base alone."""
    lib = library(impl)
    model = lib.get_peft_model(build_llama(size, torch.bfloat16), lora_config(lib, size, init_lora_weights=False))
    model.eval()
    base = build_llama(size, torch.bfloat16).eval()
    ids = token_ids(size, 1, size.infer_seq)
    rows = {}
    with torch.no_grad():
        plan = {"base": (None, lambda: base(input_ids=ids))}
        for mode in modes(impl):
            plan[mode] = (lambda mode=mode: use_mode(lib, model, mode), lambda: model(input_ids=ids))
        for name, times in interleave(plan, repeats, warmup=2).items():
            rows[name] = {"times": times}
        model.merge_adapter()
        merged = interleave({"base_for_merged": (None, lambda: base(input_ids=ids)),
                             "merged": (None, lambda: model(input_ids=ids))}, repeats, warmup=2)
        model.unmerge_adapter()
    for name, times in merged.items():
        rows[name] = {"times": times}
    return {"rows": rows, "info": {"tokens": size.infer_seq, "adapter_dtype": str(_adapter_dtype(model))}}


# -- merge precision ----------------------------------------------------------------------------

MERGE_RELATIVE_DELTA = 0.05  # each layer's ||B @ A * scaling|| is 5 % of ||W||


def _trained_like_adapter(model, relative: float) -> None:
    """Give every adapter deterministic non-zero factors, B scaled so the delta is `relative` of W.

    The values depend only on the parameter names, so both libraries get the same adapter.
    """
    generator = torch.Generator().manual_seed(1234)
    for _, layer in sorted(lora_modules(model), key=lambda item: item[0]):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        weight = layer.base_layer.weight.detach().double()
        new_a = (torch.rand(a.shape, generator=generator, dtype=torch.float64) * 2 - 1) / a.shape[1] ** 0.5
        new_b = torch.randn(b.shape, generator=generator, dtype=torch.float64)
        delta = new_b @ new_a * layer.scaling["default"]
        new_b *= relative * weight.norm() / delta.norm()
        with torch.no_grad():
            a.copy_(new_a)
            b.copy_(new_b)


def bf16_single_rounding(values: torch.Tensor) -> torch.Tensor:
    """float64 -> bf16, nearest-even, on the integer bits (torch's own cast rounds twice, via fp32).

    Exact for the normal bf16 range, which the weights here are in."""
    bits = values.view(torch.int64)
    magnitude = bits & torch.iinfo(torch.int64).max
    lsb = (magnitude >> 45) & 1
    rounded = ((magnitude + (1 << 44) - 1 + lsb) >> 45) << 45
    return ((bits & torch.iinfo(torch.int64).min) | rounded).view(torch.float64).to(torch.bfloat16)


def _merge_once(lib, size: Size, adapter_dtype: torch.dtype) -> dict:
    import time

    model = lib.get_peft_model(build_llama(size, torch.bfloat16), lora_config(lib, size),
                               autocast_adapter_dtype=adapter_dtype == torch.float32)
    _trained_like_adapter(model, MERGE_RELATIVE_DELTA)
    layers = lora_modules(model)
    originals = {name: layer.base_layer.weight.detach().clone() for name, layer in layers}
    start = time.perf_counter()
    model.merge_adapter()
    merge_s = time.perf_counter() - start
    off = total = 0
    for name, layer in layers:
        a = layer.lora_A["default"].weight.detach().double()
        b = layer.lora_B["default"].weight.detach().double()
        single_rounding = bf16_single_rounding(originals[name].double() + (b @ a) * layer.scaling["default"])
        off += int((layer.base_layer.weight != single_rounding).sum())
        total += single_rounding.numel()
    start = time.perf_counter()
    model.unmerge_adapter()
    unmerge_s = time.perf_counter() - start
    drift = sum(int((layer.base_layer.weight != originals[name]).sum()) for name, layer in layers)
    restore = model.merge_restore_nbytes() if hasattr(model, "merge_restore_nbytes") else None
    return {"off_single_rounding": off, "unmerge_changed": drift, "weights": total, "merge_s": merge_s,
            "unmerge_s": unmerge_s, "restore_bytes_while_merged": restore}


def case_merge(impl: str, size: Size, repeats: int) -> dict:
    """Merge into a bf16 base (bf16 and fp32 adapters): elements off a single rounding of the exact
    sum, elements changed by merge then unmerge, and the time each takes."""
    lib = library(impl)
    info = {f"{str(dtype).replace('torch.', '')}_adapter": _merge_once(lib, size, dtype)
            for dtype in (torch.bfloat16, torch.float32)}
    info["relative_delta"] = MERGE_RELATIVE_DELTA
    return {"rows": {}, "info": info}


# -- 4-bit ----------------------------------------------------------------------------------------

def _load_4bit(folder: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu",
                                                dtype=torch.bfloat16)


def case_qlora(impl: str, size: Size, repeats: int) -> dict:
    """A QLoRA step: bitsandbytes nf4 base (bf16 compute), fp32 adapters on every linear layer."""
    lib = library(impl)
    if impl == "loracast":
        try:
            importlib.import_module("loracast.quant.bnb")
        except ImportError:
            return {"skipped": "loracast has no bitsandbytes backend yet (loracast.quant.bnb, issue 2)"}
    with tempfile.TemporaryDirectory(prefix="loracast-bench-") as tmp:
        build_llama(size, torch.bfloat16).save_pretrained(tmp)
        model = lib.get_peft_model(_load_4bit(tmp), lora_config(lib, size))
        bound = _frozen(_load_4bit(tmp))
    ids = token_ids(size, size.batch, size.seq)
    rows = _train_timings(impl, lib, model, bound, ids, repeats)
    return {"rows": rows, "info": {"adapter_dtype": str(_adapter_dtype(model)), "tokens": size.batch * size.seq}}


CASES = {
    "inject_deep": case_inject_deep,
    "inject_meta": case_inject_meta,
    "save_load": case_save_load,
    "train_bf16_fp32": lambda impl, size, repeats: case_train(impl, size, repeats, "bf16_fp32"),
    "train_bf16_bf16": lambda impl, size, repeats: case_train(impl, size, repeats, "bf16_bf16"),
    "train_fp32_fp32": lambda impl, size, repeats: case_train(impl, size, repeats, "fp32_fp32"),
    "infer": case_infer,
    "merge": case_merge,
    "qlora": case_qlora,
}
