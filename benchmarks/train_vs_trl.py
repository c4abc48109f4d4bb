"""The main job side by side with TRL's CLI: `loracast train` against `trl sft --use_peft` on the
same model folder, data and hyperparameters, in one invocation, one run after the other.

The same work: SmolLM2-135M-Instruct (the embedded GGUF, dequantized once to a bf16 transformers
folder that every case loads), LoRA r=16, alpha 32, dropout 0 on all linear layers, AdamW at peak
lr 2e-3 with linear decay, 60 steps of 8 conversations of the shipped triage data, at most 256
tokens. TRL reads the train split as conversational prompt/completion rows (its completion-only
loss: the tokens `loracast train` trains on). Cases:

- ``trl``: `trl sft` with its defaults (gradient checkpointing on);
- ``trl-no-gc``: `trl sft --gradient_checkpointing false`, its fastest CPU setting;
- ``loracast``: `loracast train --model FOLDER` (its held-out evaluations before and after run
  too; its training time is read from its metrics);
- ``loracast-gc``: the same with ``--gradient-checkpointing``, to compare memory with TRL's defaults.

Reported per case: training time (TRL's ``train_runtime``; loracast's ``seconds.train``), the whole
command's wall time, the process's peak resident memory (``wait4``), trained tokens per second
where the tool reports them, and the held-out exact match of the saved adapter on the first 64
test conversations, judged by PEFT (`PeftModel.from_pretrained` on the bf16 base, greedy answers
scored exactly) for every case alike. Then the ratios loracast/TRL.

    PYTHONPATH=src python benchmarks/train_vs_trl.py --json /tmp/vs_trl.json           # about 35 minutes
    PYTHONPATH=src python benchmarks/train_vs_trl.py --cases trl-no-gc loracast          # fewer cases

Not a test: it needs the real model (`make demo` installs it), TRL and PEFT, and quiet cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("trl", "trl-no-gc", "loracast", "loracast-gc")
STEPS, BATCH, LR, MAX_LENGTH, EVAL_ROWS = 60, 8, 2e-3, 256, 64


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--work", type=Path, help="folder for the model, data and runs (default: a temporary one)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every case (default: torch's own)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps (default {STEPS}; fewer for a look)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def prepare(work: Path) -> tuple[Path, Path, Path]:
    """(bf16 model folder, TRL's data folder, loracast's data file) under `work`."""
    import torch

    from loracast.integrations.hf_loading import quiet_transformers
    from loracast.training.sft.data import default_chat_data_path
    from loracast.training.sft.model import default_llm_path, load_llm, load_llm_tokenizer

    model_dir = work / "smollm2-bf16"
    if not (model_dir / "config.json").is_file():
        source = default_llm_path()
        with quiet_transformers():
            model = load_llm(source, torch.bfloat16, False, torch.device("cpu"))
        model.hf_quantizer = None  # the GGUF weights are plain after loading: save them as such
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(model_dir))
        load_llm_tokenizer(source).save_pretrained(str(model_dir))
    rows = [json.loads(line) for line in default_chat_data_path().read_text(encoding="utf-8").splitlines()]
    trl_dir = work / "trl-data"
    trl_dir.mkdir(parents=True, exist_ok=True)
    with open(trl_dir / "train.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            if row["split"] == "train":
                messages = row["messages"]
                handle.write(json.dumps({"prompt": messages[:-1], "completion": messages[-1:]}) + "\n")
    return model_dir, trl_dir, default_chat_data_path()


def _run(command: list[str], log: Path, threads: int | None) -> tuple[int, float, int]:
    """(exit status, wall seconds, peak resident bytes) of `command`, its output into `log`."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    began = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - began
    return os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss * 1024


def run_trl(model_dir: Path, data_dir: Path, out: Path, gradient_checkpointing: bool, threads: int | None,
            steps: int) -> dict:
    trl = shutil.which("trl") or str(Path(sys.executable).parent / "trl")
    command = [trl, "sft", "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--use_peft",
               "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0", "--lora_target_modules", "all-linear",
               "--learning_rate", str(LR), "--per_device_train_batch_size", str(BATCH), "--max_steps", str(steps),
               "--max_length", str(MAX_LENGTH), "--dtype", "bfloat16", "--output_dir", str(out),
               "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--seed", "0"]
    if not gradient_checkpointing:
        command += ["--gradient_checkpointing", "false"]
    code, wall, peak = _run(command, out.with_suffix(".log"), threads)
    text = out.with_suffix(".log").read_text(encoding="utf-8", errors="replace")
    if code != 0:
        raise SystemExit(f"trl sft failed ({code}); see {out.with_suffix('.log')}:\n{text[-3000:]}")
    runtime = re.findall(r"'train_runtime': '?([0-9.]+)", text)
    return {"train_seconds": float(runtime[-1]) if runtime else None, "wall_seconds": wall, "peak_bytes": peak,
            "tokens_per_second": None, "adapter": str(out)}


def run_loracast(model_dir: Path, data: Path, out: Path, gradient_checkpointing: bool, threads: int | None,
                 steps: int) -> dict:
    command = [sys.executable, "-m", "loracast", "train", "--model", str(model_dir), "--data", str(data),
               "--out", str(out), "--eval-examples", str(EVAL_ROWS), "--max-steps", str(steps)]
    if gradient_checkpointing:
        command.append("--gradient-checkpointing")
    code, wall, peak = _run(command, out.with_suffix(".log"), threads)
    if code != 0:
        text = out.with_suffix(".log").read_text(encoding="utf-8", errors="replace")
        raise SystemExit(f"loracast train failed ({code}):\n{text[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return {"train_seconds": metrics["seconds"]["train"], "wall_seconds": wall, "peak_bytes": peak,
            "tokens_per_second": metrics["train"]["tokens_per_second"], "adapter": str(out / "adapter"),
            "loracast_exact_after": metrics["eval"]["after"]["exact"]}


def judge_with_peft(model_dir: Path, adapters: dict[str, str]) -> dict[str, float]:
    """Held-out exact match of each adapter, loaded by PEFT on the bf16 base, greedy answers."""
    import torch
    from peft import PeftModel

    from loracast.integrations.hf_loading import quiet_transformers
    from loracast.training.sft.data import default_chat_data_path, read_chat_examples, split_chat_examples
    from loracast.training.sft.evaluate import answer_examples, score_answers
    from loracast.training.sft.model import load_llm, load_llm_tokenizer

    examples = read_chat_examples(default_chat_data_path())
    held = split_chat_examples(examples, "triage")[1][:EVAL_ROWS]
    tokenizer = load_llm_tokenizer(model_dir)
    cpu = torch.device("cpu")
    scores = {}
    for name, adapter in adapters.items():
        with quiet_transformers():
            base = load_llm(model_dir, torch.bfloat16, False, cpu, "eager").eval()
        model = PeftModel.from_pretrained(base, adapter).eval()
        answers = answer_examples(model, tokenizer, held, 48, 32, cpu)
        scores[name] = score_answers(answers, [e.reference for e in held]).exact
    return scores


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="vs_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, trl_data, data = prepare(work)
    results: dict[str, dict] = {}
    for case in args.cases:
        out = work / case
        shutil.rmtree(out, ignore_errors=True)
        print(f"{case}: running", file=sys.stderr, flush=True)
        if case.startswith("trl"):
            results[case] = run_trl(model_dir, trl_data, out, case == "trl", args.threads, args.steps)
        else:
            results[case] = run_loracast(model_dir, data, out, case == "loracast-gc", args.threads, args.steps)
        print(f"{case}: {json.dumps(results[case])}", file=sys.stderr, flush=True)
    for case, exact in judge_with_peft(model_dir, {c: r["adapter"] for c, r in results.items()}).items():
        results[case]["peft_exact"] = exact
    print(f"{'case':14} {'train s':>9} {'wall s':>8} {'peak GB':>8} {'tok/s':>7} {'exact (PEFT)':>13}")
    for case, r in results.items():
        tokens = f"{r['tokens_per_second']:.0f}" if r["tokens_per_second"] else "-"
        print(f"{case:14} {r['train_seconds']:9.1f} {r['wall_seconds']:8.1f} {r['peak_bytes'] / 1e9:8.2f} "
              f"{tokens:>7} {r['peft_exact']:12.1%}")
    ratios = {}
    for ours, theirs in (("loracast", "trl"), ("loracast", "trl-no-gc"), ("loracast-gc", "trl")):
        if ours in results and theirs in results:
            a, b = results[ours], results[theirs]
            ratios[f"{ours}/{theirs}"] = {"train_time": a["train_seconds"] / b["train_seconds"],
                                          "peak_memory": a["peak_bytes"] / b["peak_bytes"]}
            print(f"{ours}/{theirs}: training time {ratios[f'{ours}/{theirs}']['train_time']:.2f}x, "
                  f"peak memory {ratios[f'{ours}/{theirs}']['peak_memory']:.2f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "ratios": ratios, "work": str(work)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
