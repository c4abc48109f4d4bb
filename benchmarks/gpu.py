"""loracast against PEFT on one GPU, in one process: LoRA and QLoRA training steps, unmerged
inference, injection and loading (random weights built from configs; no hub).

    python benchmarks/gpu.py --out device-results              # on a CUDA machine (a few minutes)
    python benchmarks/gpu.py --device cpu --quick --out DIR    # every case, shrunk, in seconds

Model (full): a Llama shaped like a 1B model (hidden 2048, intermediate 8192, 16 layers, 32 heads,
8 key-value heads, vocab 32000), bf16 base, LoRA r=16 alpha 32 on every linear layer, AdamW,
causal-LM loss on batch 8 x 1024. Each case builds its model afresh and runs warm-up steps, then
timed steps, each timed between CUDA synchronisations; figures are medians with min-max.
Memory is `torch.cuda.max_memory_allocated` over the warm-up and timed steps (weights, activations,
gradients and optimizer state), after a reset once the model is built.

Cases: the frozen base alone (forward and backward through every layer with activation gradients,
as LoRA needs, no weight to train: the bound a LoRA step can approach); loracast `stable`, `mixed`,
`fast`; PEFT with fp32 adapters (its default) and with bf16 adapters (`autocast_adapter_dtype=False`);
QLoRA (nf4, double quantization, bf16 compute, quant storage uint8 and bf16, each library's
`prepare_model_for_kbit_training` with gradient checkpointing) loracast against PEFT; unmerged
inference latency (batch 1 x 512) against the base; `get_peft_model` and `from_pretrained` times.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Shape:
    """The shapes of one run."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    infer_seq: int
    rank: int = 16
    warmup: int = 3
    steps: int = 10
    infer_repeats: int = 20
    qlora_storages: tuple[str, ...] = ("uint8", "bf16")


SHAPES = {
    "full": Shape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=32000, batch=8, seq=1024,
                  infer_seq=512),
    "quick": Shape(hidden=64, intermediate=128, layers=2, heads=4, vocab=512, kv_heads=2, batch=2, seq=32,
                   infer_seq=16, warmup=1, steps=1, infer_repeats=1, qlora_storages=("uint8",)),
}
# Targets the issue sets for the GPU: (case, reference case, largest ratio allowed, what is compared)
TARGETS = [
    ("loracast stable", "PEFT fp32 adapters", 1.00, "step_s"),
    ("loracast mixed", "frozen base (bound)", 1.10, "step_s"),
    ("QLoRA loracast uint8", "QLoRA PEFT uint8", 1.00, "step_s"),
    ("QLoRA loracast uint8", "QLoRA PEFT uint8", 1.00, "peak_bytes"),
    ("QLoRA loracast bf16", "QLoRA PEFT bf16", 1.00, "step_s"),
    ("QLoRA loracast bf16", "QLoRA PEFT bf16", 1.00, "peak_bytes"),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def summary(values: list[float]) -> dict[str, float]:
    """Median, min and max of `values`."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of `fn` takes, between device synchronisations."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def llama_config(shape: Shape):
    """The benchmark Llama's config."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                       max_position_embeddings=max(shape.seq, shape.infer_seq), tie_word_embeddings=False)


def build_base(shape: Shape, device: torch.device):
    """A bf16 Llama with random weights on `device` (the same weights on every call)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(shape)).to(torch.bfloat16)
    model.requires_grad_(False)
    return model


def _lora_config(lib: Any, shape: Shape) -> Any:
    return lib.LoraConfig(r=shape.rank, lora_alpha=2 * shape.rank, target_modules="all-linear", lora_dropout=0.0,
                          task_type="CAUSAL_LM")


def _batches(shape: Shape, device: torch.device, count: int, seq: int | None = None, batch: int | None = None
             ) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, shape.vocab, (batch or shape.batch, seq or shape.seq), generator=generator).to(device)
            for _ in range(count)]


def train_steps(model: Any, shape: Shape, device: torch.device, frozen: bool = False) -> dict[str, Any]:
    """Warm-up then timed AdamW steps of `model` (for `frozen`, forward and backward with activation
    gradients only); step times and peak memory."""
    batches = _batches(shape, device, shape.warmup + shape.steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    embed = model.get_input_embeddings()

    def step(ids: torch.Tensor) -> float:
        if frozen:  # the embeddings' output carries the gradient, as the first adapter's input would
            loss = model(inputs_embeds=embed(ids).requires_grad_(), labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    model.train()
    _reset_peak(device)
    times, losses = [], []
    for i, ids in enumerate(batches):
        seconds = timed(lambda ids=ids: losses.append(step(ids)), device)
        if i >= shape.warmup:
            times.append(seconds)
    return {"step_s": summary(times), "tokens_per_s": shape.batch * shape.seq / statistics.median(times),
            "peak_bytes": _peak(device), "trainable": sum(p.numel() for p in params),
            "final_loss": float(losses[-1])}


def inference_latency(model: Any, shape: Shape, device: torch.device) -> dict[str, Any]:
    """Forward of one sequence of `infer_seq` tokens, eval mode, no grad: latency median (min-max)."""
    ids = _batches(shape, device, 1, seq=shape.infer_seq, batch=1)[0]
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(shape.warmup + shape.infer_repeats):
            seconds = timed(lambda: model(input_ids=ids), device)
            if i >= shape.warmup:
                times.append(seconds)
    return {"latency_s": summary(times)}


def _libraries() -> dict[str, Any]:
    import peft

    import loracast
    return {"loracast": loracast, "PEFT": peft}


LORA_CASES = {  # name -> (library, get_peft_model keyword arguments)
    "loracast stable": ("loracast", {"precision": "stable"}),
    "loracast mixed": ("loracast", {"precision": "mixed"}),
    "loracast fast": ("loracast", {"precision": "fast"}),
    "PEFT fp32 adapters": ("PEFT", {}),
    "PEFT bf16 adapters": ("PEFT", {"autocast_adapter_dtype": False}),
}


def guarded(name: str, case: Callable[[], dict[str, Any]], device: torch.device,
            progress: Callable[[str], None]) -> dict[str, Any]:
    """`case()`'s figures, or {"error": ...} when it raises (out of memory, say): one GPU run must
    bring back every case that works."""
    try:
        entry = case()
    except Exception as exc:
        entry = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    _reset_peak(device)  # frees what the case left (gc, CUDA cache) before the next one
    progress(f"{name}: {entry['error'] if 'error' in entry else _describe(entry)}")
    return entry


def _bound_case(shape: Shape, device: torch.device) -> dict[str, Any]:
    base = build_base(shape, device)
    entry = train_steps(base, shape, device, frozen=True)
    entry.update(inference_latency(base, shape, device))
    return entry


def _lora_case(name: str, shape: Shape, device: torch.device) -> dict[str, Any]:
    lib_name, kwargs = LORA_CASES[name]
    lib = _libraries()[lib_name]
    base = build_base(shape, device)
    _sync(device)
    start = time.perf_counter()
    model = lib.get_peft_model(base, _lora_config(lib, shape), **kwargs)
    _sync(device)
    inject_s = time.perf_counter() - start
    entry = train_steps(model, shape, device)
    entry["get_peft_model_s"] = inject_s
    entry["adapter_dtype"] = str(next(p.dtype for n, p in model.named_parameters() if "lora_" in n))
    if name in ("loracast stable", "PEFT fp32 adapters"):
        entry.update(inference_latency(model, shape, device))
        entry["from_pretrained_s"] = _from_pretrained_s(lib, model, shape, device)
    return entry


def lora_cases(shape: Shape, device: torch.device, progress: Callable[[str], None]) -> dict[str, Any]:
    """Training step of the bound and of every LoRA case; unmerged inference; injection and loading."""
    results = {"frozen base (bound)": guarded("frozen base (bound)", lambda: _bound_case(shape, device), device,
                                              progress)}
    for name in LORA_CASES:
        results[name] = guarded(name, lambda name=name: _lora_case(name, shape, device), device, progress)
    return results


def _from_pretrained_s(lib: Any, model: Any, shape: Shape, device: torch.device) -> float:
    """Seconds `PeftModel.from_pretrained` takes to load `model`'s adapter onto a fresh base."""
    with tempfile.TemporaryDirectory(prefix="loracast-gpu-bench-") as folder:
        model.save_pretrained(folder)
        base = build_base(shape, device)
        _sync(device)
        start = time.perf_counter()
        lib.PeftModel.from_pretrained(base, folder)
        _sync(device)
        return time.perf_counter() - start


def _qlora_case(folder: str, lib_name: str, storage: str, shape: Shape, device: torch.device) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    lib = _libraries()[lib_name]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_quant_storage=torch.uint8 if storage == "uint8" else torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map={"": str(device)},
                                                dtype=torch.bfloat16)
    base = lib.prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    return train_steps(lib.get_peft_model(base, _lora_config(lib, shape)), shape, device)


def qlora_cases(shape: Shape, device: torch.device, progress: Callable[[str], None]) -> dict[str, Any]:
    """QLoRA training steps, loracast against PEFT, on nf4 double-quantized bases (storage uint8 and bf16)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="loracast-gpu-bench-") as folder:
        build_base(shape, device).save_pretrained(folder)  # random weights drawn on the device: fast
        for storage in shape.qlora_storages:
            for lib_name in ("loracast", "PEFT"):
                name = f"QLoRA {lib_name} {storage}"
                results[name] = guarded(name, lambda lib_name=lib_name, storage=storage: _qlora_case(
                    folder, lib_name, storage, shape, device), device, progress)
    return results


def _describe(entry: dict[str, Any]) -> str:
    parts = [f"step {entry['step_s']['median'] * 1e3:.1f} ms"]
    if entry.get("peak_bytes") is not None:
        parts.append(f"peak {entry['peak_bytes'] / 2**30:.2f} GiB")
    if "latency_s" in entry:
        parts.append(f"inference {entry['latency_s']['median'] * 1e3:.2f} ms")
    return ", ".join(parts)


def check_targets(cases: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue: the ratio measured and whether it is met (None where a figure is missing)."""
    out = []
    for case, reference, limit, what in TARGETS:
        mine, theirs = cases.get(case, {}).get(what), cases.get(reference, {}).get(what)
        mine, theirs = (v["median"] if isinstance(v, dict) else v for v in (mine, theirs))
        ratio = mine / theirs if mine is not None and theirs else None
        out.append({"case": case, "reference": reference, "what": what, "limit": limit, "ratio": ratio,
                    "met": None if ratio is None else ratio <= limit})
    return out


def environment(device: torch.device) -> dict[str, Any]:
    """The machine and library versions of this run."""
    import importlib.metadata as metadata

    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "loracast"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if versions["loracast"] is None:  # run from the source tree
        import loracast
        versions["loracast"] = loracast.__version__
    versions["torch"] = torch.__version__
    env: dict[str, Any] = {"python": platform.python_version(), "device": str(device), "versions": versions}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, driver=_driver_version())
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine())
    return env


def _driver_version() -> str | None:
    import subprocess

    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    env, shape = results["environment"], results["shape"]
    lines = (["Quick run: tiny shapes and one timed step, to check that every case runs; its figures mean nothing.", ""]
             if results["quick"] else [])
    lines += [f"GPU benchmark: {env.get('gpu') or env['device']}; torch {env['versions']['torch']}, "
             f"transformers {env['versions']['transformers']}, PEFT {env['versions']['peft']}, "
             f"bitsandbytes {env['versions']['bitsandbytes']}, loracast {env['versions']['loracast']}"
             + (f", CUDA {env['cuda']}, driver {env['driver']}" if env.get("gpu") else ""),
             "",
             f"Llama hidden {shape['hidden']}, {shape['layers']} layers, vocab {shape['vocab']}, bf16 base; "
             f"LoRA r={shape['rank']} all-linear; batch {shape['batch']} x {shape['seq']}; "
             f"median (min-max) of {shape['steps']} steps after {shape['warmup']} warm-up",
             "",
             "| case | step (ms) | tokens/s | peak memory (GiB) | adapters | get_peft_model (s) | from_pretrained (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in results["cases"].items():
        if "error" in entry:
            lines.append(f"| {name} | failed: {entry['error']} | | | | | |")
            continue
        step = entry["step_s"]
        peak = f"{entry['peak_bytes'] / 2**30:.2f}" if entry.get("peak_bytes") is not None else "n/a (CPU)"
        lines.append(f"| {name} | {step['median'] * 1e3:.1f} ({step['min'] * 1e3:.1f}-{step['max'] * 1e3:.1f}) | "
                     f"{entry['tokens_per_s']:,.0f} | {peak} | {entry.get('adapter_dtype', '-')} | "
                     f"{_seconds(entry.get('get_peft_model_s'))} | {_seconds(entry.get('from_pretrained_s'))} |")
    lines += ["", f"Unmerged inference, batch 1 x {shape['infer_seq']}:", "", "| model | latency (ms) |", "|---|---|"]
    for name, entry in results["cases"].items():
        if "latency_s" in entry:
            latency = entry["latency_s"]
            lines.append(f"| {name} | {latency['median'] * 1e3:.2f} ({latency['min'] * 1e3:.2f}-"
                         f"{latency['max'] * 1e3:.2f}) |")
    lines += ["", "| target | ratio | limit | met |", "|---|---|---|---|"]
    for target in results["targets"]:
        ratio = "-" if target["ratio"] is None else f"{target['ratio']:.3f}"
        met = {True: "yes", False: "NO", None: "-"}[target["met"]]
        lines.append(f"| {target['case']} / {target['reference']} ({target['what']}) | {ratio} | "
                     f"{target['limit']:.2f} | {met} |")
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def run(device: torch.device, quick: bool, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Every case on `device`; the results (cases, targets, shape, environment)."""
    shape = SHAPES["quick" if quick else "full"]
    warnings.filterwarnings("ignore", module="peft")
    progress(f"GPU benchmark on {device}: {'quick' if quick else 'full'} shapes")
    cases = lora_cases(shape, device, progress)
    cases.update(qlora_cases(shape, device, progress))
    return {"shape": asdict(shape), "quick": quick, "cases": cases, "targets": check_targets(cases),
            "environment": environment(device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few steps: every case in seconds")
    parser.add_argument("--out", type=Path, default=Path("device-results"),
                        help="folder for gpu_benchmark.json and gpu_benchmark.md (default device-results)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu --quick")
    results = run(device, args.quick, progress=lambda line: print(line, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_benchmark.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "gpu_benchmark.md").write_text(markdown(results))
    print(markdown(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))  # the loracast of this tree, when it is not installed
    sys.exit(main())
