"""Where `get_peft_model` spends its time on the benchmark's deep model: a cProfile summary.

    PYTHONPATH=src python benchmarks/profile_inject.py              # loracast
    PYTHONPATH=src python benchmarks/profile_inject.py --impl peft
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import sys
import time

import torch

from cases import library, lora_config, quiet
from models import SIZES, deep_template, fresh_copy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=("loracast", "peft"), default="loracast")
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(1)
    size = SIZES["full"]
    lib = library(args.impl)
    template = deep_template(size)
    lib.get_peft_model(fresh_copy(template), lora_config(lib, size))  # warm-up
    times = []
    for _ in range(5):
        model = fresh_copy(template)
        gc.collect()
        start = time.perf_counter()
        lib.get_peft_model(model, lora_config(lib, size))
        times.append(time.perf_counter() - start)
    model = fresh_copy(template)
    gc.collect()
    profiler = cProfile.Profile()
    profiler.enable()
    lib.get_peft_model(model, lora_config(lib, size))
    profiler.disable()
    print(f"{args.impl} get_peft_model, {size.deep_layers} layers x 7 targets: best of 5 "
          f"{1e3 * min(times):.1f} ms (the profile below runs slower: cProfile adds per-call overhead)")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.rows)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print("\n".join(line.replace(sys.prefix, "<venv>") for line in lines[start - 1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
