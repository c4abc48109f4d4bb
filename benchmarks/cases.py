"""The benchmark cases. Each case runs both libraries in the current process, interleaved round
by round (the cores are shared: alternatives measured side by side see the same load), and
returns plain numbers (seconds, bytes, counts). Peak memory is measured separately, one library
per process (`MEMORY`). `run.py` starts a fresh process for each.

Variants: PEFT runs its only computation ("peft"); loracast runs both compute modes on the same
model ("exact": PEFT's arithmetic bit for bit, the default; "fast": the LoRA branch in the
activation dtype, see `loracast.set_lora_compute`). Where a case has a lower bound (the frozen
base model), the bound runs in the same process, interleaved with the variants.
"""

from __future__ import annotations

import gc
import importlib
import itertools
import logging
import os
import tempfile
import warnings

import torch

from harness import interleave, peak_rss_of
from models import Size, build_llama, deep_template, fresh_copy, meta_llama, token_ids
from qlora_step import load_4bit

IMPLS = ("peft", "loracast")
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

def _row(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """A result row: wall seconds ("times") and CPU seconds ("cpu") per call."""
    return {"times": times["wall"], "cpu": times["cpu"]}


def _fresh(factory):
    """A setup for `interleave`: a new model from `factory`, garbage collected beforehand."""
    def setup():
        gc.collect()
        return factory()
    return setup


def _inject_case(size: Size, repeats: int, factory) -> dict:
    libs = {impl: library(impl) for impl in IMPLS}
    plan = {impl: (_fresh(factory), lambda model, lib=lib: lib.get_peft_model(model, lora_config(lib, size)))
            for impl, lib in libs.items()}
    times = interleave(plan, repeats, warmup=1)
    targets = {impl: len(lora_modules(lib.get_peft_model(factory(), lora_config(lib, size))))
               for impl, lib in libs.items()}
    return {"rows": {impl: _row(times[impl]) for impl in libs}, "info": {"targets": targets}}


def case_inject_deep(size: Size, repeats: int) -> dict:
    """get_peft_model on a deep, narrow Llama (7 targets per layer)."""
    template = deep_template(size)
    return _inject_case(size, repeats, lambda: fresh_copy(template))


def case_inject_meta(size: Size, repeats: int) -> dict:
    """get_peft_model on a 7B-shaped Llama built on the meta device."""
    return _inject_case(size, repeats, lambda: meta_llama(size))


def case_save_load(size: Size, repeats: int) -> dict:
    """save_pretrained and PeftModel.from_pretrained of an adapter on every linear of the deep model."""
    libs = {impl: library(impl) for impl in IMPLS}
    template = deep_template(size)
    models = {impl: lib.get_peft_model(fresh_copy(template), lora_config(lib, size, init_lora_weights=False))
              for impl, lib in libs.items()}
    with tempfile.TemporaryDirectory(prefix="loracast-bench-") as tmp:
        counters = {impl: itertools.count() for impl in libs}
        plan = {f"save_{impl}": (lambda impl=impl: os.path.join(tmp, f"{impl}{next(counters[impl])}"),
                                 lambda folder, impl=impl: models[impl].save_pretrained(folder))
                for impl in libs}
        times = interleave(plan, repeats, warmup=1)
        folders = {impl: os.path.join(tmp, f"{impl}0") for impl in libs}
        file_bytes = {impl: os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
                      for impl, folder in folders.items()}
        plan = {f"load_{impl}": (_fresh(lambda: fresh_copy(template)),
                                 lambda base, lib=lib, impl=impl: lib.PeftModel.from_pretrained(base, folders[impl]))
                for impl, lib in libs.items()}
        times.update(interleave(plan, repeats, warmup=1))
    return {"rows": {name: _row(values) for name, values in times.items()},
            "info": {"targets": len(lora_modules(models["loracast"])), "file_bytes": file_bytes}}


# -- training and inference ---------------------------------------------------------------------

def _frozen(model):
    for param in model.parameters():
        param.requires_grad_(False)
    return model.train()


def _step_fn(model, ids: torch.Tensor):
    """One AdamW step over the trainable parameters of `model` (forward, backward, update)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _bound_fn(bound, ids: torch.Tensor):
    """The frozen base's forward plus a backward to its inputs only: what any LoRA step must pay."""
    def bound_step() -> None:
        embeds = bound.get_input_embeddings()(ids).detach().requires_grad_(True)
        bound(inputs_embeds=embeds, labels=ids).loss.backward()
    return bound_step


def _step_plan(models: dict, ids: torch.Tensor, bound) -> dict:
    """interleave() plan: the bound, PEFT, and loracast in each compute mode."""
    plan = {"bound": (None, _bound_fn(bound, ids))}
    for impl, model in models.items():
        step = _step_fn(model, ids)
        for mode in modes(impl):
            plan[mode] = (lambda lib=library(impl), model=model, mode=mode: use_mode(lib, model, mode), step)
    return plan


def _peft_model(impl: str, size: Size, base_dtype: torch.dtype, adapter_dtype: torch.dtype):
    lib = library(impl)
    model = lib.get_peft_model(build_llama(size, base_dtype), lora_config(lib, size),
                               autocast_adapter_dtype=adapter_dtype == torch.float32)
    if _adapter_dtype(model) != adapter_dtype:
        raise RuntimeError(f"{impl} made {_adapter_dtype(model)} adapters, expected {adapter_dtype}")
    return model


def case_train(size: Size, repeats: int, precision: str) -> dict:
    """One AdamW training step (forward, backward, optimizer), both libraries and the frozen-base
    bound interleaved in this process."""
    base_dtype, adapter_dtype = PRECISIONS[precision]
    models = {impl: _peft_model(impl, size, base_dtype, adapter_dtype) for impl in IMPLS}
    ids = token_ids(size, size.batch, size.seq)
    times = interleave(_step_plan(models, ids, _frozen(build_llama(size, base_dtype))), repeats, warmup=1)
    return {"rows": {name: _row(values) for name, values in times.items()},
            "info": {"base_dtype": str(base_dtype), "adapter_dtype": str(adapter_dtype),
                     "tokens": size.batch * size.seq}}


def step_memory(model, impl: str, ids: torch.Tensor) -> dict:
    """Peak RSS of one training step per variant, after a warm-up step that creates the optimizer state."""
    step = _step_fn(model, ids)
    lib = library(impl)
    peaks = {}
    for mode in modes(impl):
        use_mode(lib, model, mode)
        step()
        peaks[mode] = peak_rss_of(step)
    return peaks


def memory_train(impl: str, size: Size, precision: str) -> dict:
    """Peak RSS of a training step of one library, alone in its process (base weights included)."""
    base_dtype, adapter_dtype = PRECISIONS[precision]
    model = _peft_model(impl, size, base_dtype, adapter_dtype)
    return step_memory(model, impl, token_ids(size, size.batch, size.seq))


def case_infer(size: Size, repeats: int) -> dict:
    """Forward latency of one sequence, bf16 base + fp32 adapters: unmerged, merged, and the base alone."""
    models = {impl: library(impl).get_peft_model(build_llama(size, torch.bfloat16),
                                                 lora_config(library(impl), size, init_lora_weights=False))
              for impl in IMPLS}
    base = build_llama(size, torch.bfloat16).eval()
    ids = token_ids(size, 1, size.infer_seq)
    plan = {"base": (None, lambda: base(input_ids=ids))}
    for impl, model in models.items():
        model.eval()
        for mode in modes(impl):
            plan[mode] = (lambda lib=library(impl), model=model, mode=mode: use_mode(lib, model, mode),
                          lambda model=model: model(input_ids=ids))
    with torch.no_grad():
        times = interleave(plan, repeats, warmup=2)
        for model in models.values():
            model.merge_adapter()
        merged = {"base_for_merged": (None, lambda: base(input_ids=ids))}
        for impl, model in models.items():
            merged[f"merged_{impl}"] = (None, lambda model=model: model(input_ids=ids))
        times.update(interleave(merged, repeats, warmup=2))
    return {"rows": {name: _row(values) for name, values in times.items()},
            "info": {"tokens": size.infer_seq, "adapter_dtype": str(_adapter_dtype(models["loracast"]))}}


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
    restore = model.merge_restore_nbytes() if hasattr(model, "merge_restore_nbytes") else None
    start = time.perf_counter()
    model.unmerge_adapter()
    unmerge_s = time.perf_counter() - start
    drift = sum(int((layer.base_layer.weight != originals[name]).sum()) for name, layer in layers)
    return {"off_single_rounding": off, "unmerge_changed": drift, "weights": total, "merge_s": merge_s,
            "unmerge_s": unmerge_s, "restore_bytes_while_merged": restore}


def case_merge(size: Size, repeats: int) -> dict:
    """Merge into a bf16 base (bf16 and fp32 adapters): elements off a single rounding of the exact
    sum, elements changed by merge then unmerge, and the time each takes; one library at a time."""
    info = {impl: {f"{str(dtype).replace('torch.', '')}_adapter": _merge_once(library(impl), size, dtype)
                   for dtype in (torch.bfloat16, torch.float32)} for impl in IMPLS}
    info["relative_delta"] = MERGE_RELATIVE_DELTA
    return {"rows": {}, "info": info}


# -- 4-bit ----------------------------------------------------------------------------------------

def _has_bnb_backend() -> bool:
    try:
        importlib.import_module("loracast.quant.bnb")
    except ImportError:
        return False
    return True


NO_BNB = "loracast has no bitsandbytes backend yet (loracast.quant.bnb, issue 2)"


def _qlora_model(impl: str, folder: str, size: Size):
    lib = library(impl)
    return lib.get_peft_model(load_4bit(folder), lora_config(lib, size))


def case_qlora(size: Size, repeats: int) -> dict:
    """A QLoRA step: bitsandbytes nf4 base (double quantization, bf16 compute; norms, embeddings
    and head stay bf16, no gradient checkpointing), fp32 adapters on every linear layer; both
    libraries and the frozen 4-bit bound interleaved in this process. `qlora_step.py` measures
    PEFT's full recipe (prepare_model_for_kbit_training's fp32 upcasts, checkpointing)."""
    if not _has_bnb_backend():
        return {"skipped": NO_BNB}
    with tempfile.TemporaryDirectory(prefix="loracast-bench-") as tmp:
        build_llama(size, torch.bfloat16).save_pretrained(tmp)
        models = {impl: _qlora_model(impl, tmp, size) for impl in IMPLS}
        bound = _frozen(load_4bit(tmp))
    ids = token_ids(size, size.batch, size.seq)
    times = interleave(_step_plan(models, ids, bound), repeats, warmup=1)
    return {"rows": {name: _row(values) for name, values in times.items()},
            "info": {"adapter_dtype": str(_adapter_dtype(models["loracast"])), "tokens": size.batch * size.seq}}


def memory_qlora(impl: str, size: Size) -> dict:
    """Peak RSS of a QLoRA step of one library, alone in its process."""
    if not _has_bnb_backend():
        return {}
    with tempfile.TemporaryDirectory(prefix="loracast-bench-") as tmp:
        build_llama(size, torch.bfloat16).save_pretrained(tmp)
        model = _qlora_model(impl, tmp, size)
    return step_memory(model, impl, token_ids(size, size.batch, size.seq))


CASES = {  # name -> fn(size, repeats): timings of both libraries, in one process
    "inject_deep": case_inject_deep,
    "inject_meta": case_inject_meta,
    "save_load": case_save_load,
    "train_bf16_fp32": lambda size, repeats: case_train(size, repeats, "bf16_fp32"),
    "train_bf16_bf16": lambda size, repeats: case_train(size, repeats, "bf16_bf16"),
    "train_fp32_fp32": lambda size, repeats: case_train(size, repeats, "fp32_fp32"),
    "infer": case_infer,
    "merge": case_merge,
    "qlora": case_qlora,
}

MEMORY = {  # name -> fn(impl, size): peak RSS per variant of one library, alone in a process
    "train_bf16_fp32": lambda impl, size: memory_train(impl, size, "bf16_fp32"),
    "train_bf16_bf16": lambda impl, size: memory_train(impl, size, "bf16_bf16"),
    "train_fp32_fp32": lambda impl, size: memory_train(impl, size, "fp32_fp32"),
    "qlora": memory_qlora,
}
