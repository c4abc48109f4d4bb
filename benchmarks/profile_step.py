"""Where a training step's time goes beyond the frozen-base bound: a torch-profiler diff.

Profiles `--steps` steps of one variant and of the bound (interleaved, same process), then
prints, per operator, the self CPU time per step of each and the difference: the rows at the
top are what the LoRA adapters add over the base model's own forward and input backward.

    PYTHONPATH=src python benchmarks/profile_step.py --precision bf16_bf16 --variant exact
    PYTHONPATH=src python benchmarks/profile_step.py --precision bf16_fp32 --variant peft
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from cases import PRECISIONS, _bound_fn, _frozen, _peft_model, _step_fn, library, quiet, use_mode
from models import SIZES, build_llama, token_ids


def _self_times(fn, steps: int) -> dict[str, float]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages():
        totals[event.key] += event.self_cpu_time_total / 1e3 / steps  # ms per step
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=list(PRECISIONS), default="bf16_fp32")
    parser.add_argument("--variant", choices=("peft", "exact", "fast"), default="fast")
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    base_dtype, adapter_dtype = PRECISIONS[args.precision]
    impl = "peft" if args.variant == "peft" else "loracast"
    model = _peft_model(impl, size, base_dtype, adapter_dtype)
    use_mode(library(impl), model, args.variant)
    ids = token_ids(size, size.batch, size.seq)
    step, bound = _step_fn(model, ids), _bound_fn(_frozen(build_llama(size, base_dtype)), ids)
    step(), bound(), step(), bound()  # warm-up
    lora, base = _self_times(step, args.steps), _self_times(bound, args.steps)
    total_lora, total_base = sum(lora.values()), sum(base.values())
    print(f"{args.variant} ({args.precision}, {args.threads} thread(s)): {total_lora:.0f} ms/step self CPU, "
          f"bound {total_base:.0f} ms/step, ratio {total_lora / total_base:.3f}")
    matmuls = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")
    mm_lora, mm_base = sum(lora.get(k, 0) for k in matmuls), sum(base.get(k, 0) for k in matmuls)
    print(f"matrix products ({', '.join(matmuls)}): {mm_lora:.0f} ms/step, bound {mm_base:.0f} ms/step, "
          f"added {mm_lora - mm_base:.0f} ms ({(mm_lora - mm_base) / total_base:.1%} of the bound); everything else "
          f"added {(total_lora - mm_lora) - (total_base - mm_base):.0f} ms")
    print(f"{'operator':58s} {'variant ms':>10s} {'bound ms':>9s} {'added ms':>9s}")
    ranked = sorted(set(lora) | set(base), key=lambda k: base.get(k, 0) - lora.get(k, 0))
    for key in ranked[:args.rows] + ranked[-3:]:
        print(f"{key[:58]:58s} {lora.get(key, 0):10.1f} {base.get(key, 0):9.1f} {lora.get(key, 0) - base.get(key, 0):9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
