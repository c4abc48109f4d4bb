"""DoRA: a training step and the weight norm's precision, loracast against PEFT, in one invocation.

Speed: the same Llama (built from a config, random weights) gets DoRA (`use_dora=True`, r=16,
alpha 32, every linear layer) from each library; one AdamW step each (forward, backward,
optimizer), interleaved round by round in this process with the order rotating (the cores are
shared and load drifts), after untimed warm-up steps. Reported: median wall and CPU time per
step with min-max, and the ratio loracast / PEFT (below 1: loracast is faster).

Precision: on a bf16 base, the per-row weight norm ``||W + s*B@A||`` that scales every DoRA
output, computed by each library from the same weights, against a float64 reference: PEFT's
with bf16 adapters (autocast off, where PEFT computes the norm in bf16) and fp32 adapters
(autocast on), loracast's in both cases; and each library's initial magnitude (the norm at
creation) against the float64 norm of the base weight.

    PYTHONPATH=src python benchmarks/dora_step.py                 # defaults: a few minutes on 2 cores
    PYTHONPATH=src python benchmarks/dora_step.py --repeats 3 --layers 1   # a quick look

Not a test: the timings depend on the machine and its load. Quote medians with their range.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys

import torch

from cases import _step_fn, quiet
from harness import interleave, load_average, machine

IMPLEMENTATIONS = ("peft", "loracast")


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per library (interleaved)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the Llama")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (intermediate = 2.75x)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="base dtype (adapters fp32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is the work done)")
    parser.add_argument("--json", help="also write the results to this file")
    return parser.parse_args(argv)


def _llama(args: argparse.Namespace, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                         vocab_size=args.vocab, max_position_embeddings=args.seq, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def _dora_model(impl: str, args: argparse.Namespace, dtype: torch.dtype):
    lib = importlib.import_module(impl)
    config = lib.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0,
                            use_dora=True)
    return lib.get_peft_model(_llama(args, dtype), config)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def speed(args: argparse.Namespace) -> dict:
    """Median step times of both libraries, interleaved, and their ratio."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    plan = {impl: (None, _step_fn(_dora_model(impl, args, dtype), ids)) for impl in IMPLEMENTATIONS}
    times = interleave(plan, args.repeats, warmup=args.warmup)
    out = {impl: {kind: _stats(times[impl][kind]) for kind in ("wall", "cpu")} for impl in IMPLEMENTATIONS}
    out["ratio_wall"] = out["loracast"]["wall"]["median"] / out["peft"]["wall"]["median"]
    out["ratio_cpu"] = out["loracast"]["cpu"]["median"] / out["peft"]["cpu"]["median"]
    return out


def _relative_error(values: torch.Tensor, reference: torch.Tensor) -> float:
    return ((values.double() - reference).abs() / reference).max().item()


def precision(hidden: int = 1024, rank: int = 16, seed: int = 0) -> dict:
    """Max relative error of each library's DoRA weight norm on a bf16 base, against float64."""
    import peft

    import loracast

    out: dict[str, dict[str, float]] = {}
    for autocast, label in ((False, "bf16 adapters"), (True, "fp32 adapters")):
        models = {}
        for impl, lib in (("peft", peft), ("loracast", loracast)):
            torch.manual_seed(seed)
            base = torch.nn.Sequential(torch.nn.Linear(hidden, hidden)).to(torch.bfloat16)
            config = lib.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"], use_dora=True)
            models[impl] = lib.get_peft_model(base, config, autocast_adapter_dtype=autocast)
        ours, theirs = (models[i].base_model.model[0] for i in ("loracast", "peft"))
        weight = ours.base_layer.weight.double()
        initial = weight.norm(dim=1)
        row = {"peft_initial_magnitude": _relative_error(theirs.lora_magnitude_vector["default"].weight, initial),
               "loracast_initial_magnitude": _relative_error(ours.lora_magnitude_vector["default"].weight, initial)}
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # a trained-looking update: |s*B@A| about 10 % of |W| per row
            for layer in (ours, theirs):
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                a.copy_(torch.randn(a.shape, generator=generator).to(a.dtype) / hidden ** 0.5)
                b.copy_(torch.randn(b.shape, generator=generator).to(b.dtype) * 0.05 / (2 * rank) ** 0.5)
                generator.manual_seed(seed + 1)
        a, b = ours.lora_A["default"].weight.double(), ours.lora_B["default"].weight.double()
        reference = (weight + ours.scaling["default"] * b @ a).norm(dim=1)
        # PEFT's forward computes the norm from the weights cast to the activation dtype (= adapter dtype)
        act = theirs.lora_A["default"].weight.dtype
        magnitude_layer = theirs.lora_magnitude_vector["default"]
        lora_weight = magnitude_layer.get_lora_weight(theirs.lora_A["default"], theirs.lora_B["default"]).to(act)
        peft_norm = magnitude_layer.get_weight_norm(theirs.base_layer.weight.to(act), lora_weight,
                                                    theirs.scaling["default"])
        row["peft_weight_norm"] = _relative_error(peft_norm, reference)
        row["loracast_weight_norm"] = _relative_error(ours.lora_variant["default"].weight_norm(ours, "default"), reference)
        out[label] = row
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    result = {"machine": machine(), "args": vars(args), "load_before": load_average()}
    result["precision"] = precision()
    for label, row in result["precision"].items():
        print(f"weight norm on a bf16 base, {label}: max relative error vs float64: "
              f"PEFT {row['peft_weight_norm']:.2e}, loracast {row['loracast_weight_norm']:.2e}; "
              f"initial magnitude: PEFT {row['peft_initial_magnitude']:.2e}, "
              f"loracast {row['loracast_initial_magnitude']:.2e}")
    result["speed"] = speed(args)
    result["load_after"] = load_average()
    s = result["speed"]
    for impl in IMPLEMENTATIONS:
        wall, cpu = s[impl]["wall"], s[impl]["cpu"]
        print(f"{impl:9s} DoRA step ({args.dtype} base, {args.layers} layers, hidden {args.hidden}, "
              f"{args.batch}x{args.seq} tokens, r={args.rank}): wall {wall['median']:.3f} s "
              f"({wall['min']:.3f}-{wall['max']:.3f}), cpu {cpu['median']:.3f} s ({cpu['min']:.3f}-{cpu['max']:.3f})")
    print(f"ratio loracast / PEFT: wall {s['ratio_wall']:.2f}, cpu {s['ratio_cpu']:.2f} "
          f"(median of {args.repeats} interleaved steps each; load {result['load_before']} -> {result['load_after']})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
