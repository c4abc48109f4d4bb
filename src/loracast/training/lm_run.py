"""A complete SFT run of a causal LM: build, train, evaluate before and after, and write the
adapter, metrics.json, the plot and the before/after samples; and the same run under two precision
policies side by side.

Files of a run in OUT: ``adapter/`` (PEFT's files, the fingerprint inside, plus ``sft.json``:
how prompts were built, read by ``loracast generate``), ``metrics.json``, ``training_curve.png``,
``samples.md`` (a few held-out examples, base and adapter answers side by side) and
``samples.jsonl`` (every held-out answer). The output folder is only written once training has
finished, so a run that fails early leaves nothing half-written.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from loracast._atomic import atomic_write_text
from loracast._version import __version__
from loracast.training.chat_data import ChatExample, read_chat_examples, split_chat_examples
from loracast.training.chat_template import check_template, encode_all
from loracast.training.data import DataError
from loracast.training.lm_loop import SftHistory, SftSettings, train_sft
from loracast.training.lm_setup import LlmSpec, build_sft_model, llm_display_name, load_llm_tokenizer
from loracast.training.plot import plot_runs
from loracast.training.report import precision_summary, reset_peak_memory
from loracast.training.run import ADAPTER_DIR, COMPARE_NAME, CURVE_NAME, METRICS_NAME, prepare_out, write_json
from loracast.training.setup import SetupError, base_dtype_name

SFT_NAME = "sft.json"  # beside the adapter: the system prompt and format generation should reuse
SAMPLES_MD = "samples.md"
SAMPLES_JSONL = "samples.jsonl"
SHOWN_SAMPLES = 4


@dataclass
class SftOptions:
    """Everything `loracast train` can be asked for on instruction data."""

    model: LlmSpec
    data: Path
    out: Path = Path("out/train")
    precision: str = "stable"
    eval_fraction: float = 0.2
    eval_examples: int | None = None  # cap on held-out examples evaluated (the first N); None: all
    settings: SftSettings = field(default_factory=SftSettings)


@dataclass
class SftResult:
    """A finished SFT run: where its files are and what it measured."""

    policy: str
    out: Path
    history: SftHistory
    metrics: dict[str, Any]
    held_out: list[ChatExample]


def load_sft_data(options: SftOptions) -> tuple[list[ChatExample], list[ChatExample]]:
    """(train, held-out) examples of the run's data file, the held-out part capped at `eval_examples`."""
    examples = read_chat_examples(options.data)
    train, held = split_chat_examples(examples, str(options.data), options.eval_fraction, options.settings.seed)
    if options.eval_examples is not None:
        held = held[:options.eval_examples]
    return train, held


def _common_system_prompt(examples: Sequence[ChatExample]) -> str | None:
    prompts = Counter(e.messages[0]["content"] for e in examples if e.messages[0]["role"] == "system")
    return prompts.most_common(1)[0][0] if prompts else None


def train_sft_once(options: SftOptions, policy: str, train: list[ChatExample], held: list[ChatExample],
                   device: torch.device, out: Path) -> SftResult:
    """Train one adapter under `policy` and write its files into `out`."""
    reset_peak_memory(device)
    began = time.perf_counter()
    # the data is checked against the tokenizer before the model is loaded: bad input fails fast
    tokenizer = load_llm_tokenizer(options.model.source, options.model.chat_template)
    source = str(options.data)
    check_template(tokenizer, [*train, *held], source)
    settings = options.settings
    train_encoded, _, skipped_train = encode_all(tokenizer, train, settings.max_length)
    held_encoded, held_kept, skipped_held = encode_all(tokenizer, held, settings.max_length)
    if not train_encoded:
        raise DataError(f"{source}: all {len(train)} training examples are longer than --max-length "
                        f"{settings.max_length} tokens; raise --max-length")
    if not held_kept:
        raise DataError(f"{source}: all {len(held)} held-out examples are longer than --max-length "
                        f"{settings.max_length} tokens; raise --max-length")
    torch.manual_seed(settings.seed)  # the adapters' initial values: the same for every policy
    model = build_sft_model(options.model, policy, device, tokenizer)
    loaded = time.perf_counter()
    name = llm_display_name(options.model.source)
    print(f"{policy}: {name} (base {base_dtype_name(model)}) on {options.data.name}: {len(train_encoded)} train / "
          f"{len(held_kept)} held-out conversations, device {device}", file=sys.stderr)
    if skipped_train or skipped_held:
        print(f"{policy}: skipped {skipped_train} train and {skipped_held} held-out examples longer than "
              f"--max-length {settings.max_length} tokens", file=sys.stderr)
    history, optimizer = train_sft(model, tokenizer, train_encoded, held_kept, held_encoded, settings, device,
                                   label=policy)
    trained = time.perf_counter()
    summary = precision_summary(model, optimizer, history, policy, device)
    config = model.peft_config["default"]
    before, after = history.evaluations[0], history.evaluations[-1]
    metrics = {
        "loracast_version": __version__,
        "task": "sft",
        "model": str(options.model.source),
        "model_name": name,
        "data": source,
        "policy": policy,
        "base_dtype": base_dtype_name(model),
        "adapter_dtypes": summary["parameters"].get("adapters", {}).get("dtypes", {}),
        "lora": {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                 "target_modules": sorted(config.target_modules) if isinstance(config.target_modules, (set, list))
                 else config.target_modules},
        "train": {**asdict(settings), "examples": len(train_encoded), "skipped_too_long": skipped_train,
                  "steps": len(history.steps), "gradient_checkpointing": options.model.gradient_checkpointing,
                  "attention": getattr(model.config, "_attn_implementation", None),
                  "head_on_labelled_positions_only": history.head_on_labelled_only,
                  "tokens_per_second": history.tokens_per_second()},
        "eval": {"examples": len(held_kept), "skipped_too_long": skipped_held, "before": before.to_dict(),
                 "after": after.to_dict(), "evaluations": [e.to_dict() for e in history.evaluations]},
        "diverged_at_step": history.diverged_at_step,
        "precision_summary": summary,
        "seconds": {"load": loaded - began, "train": trained - loaded,
                    "eval": sum(e.seconds for e in history.evaluations)},
        "history": history.to_dict(),
    }
    prepare_out(out)
    adapter = out / ADAPTER_DIR
    model.save_pretrained(adapter)
    write_json(adapter / SFT_NAME, {"system": _common_system_prompt(train), "plain": all(e.plain for e in train),
                                    "max_new_tokens": settings.max_new_tokens, "model": str(options.model.source)})
    plot_runs([(policy, history)], out / CURVE_NAME,
              f"{name}: LoRA r={config.r}, policy {policy}, base {metrics['base_dtype']}, adapters "
              f"{'/'.join(metrics['adapter_dtypes']) or '?'}", score_name="held-out exact match")
    _write_samples(out, held_kept, before.answers, after.answers)
    metrics["doctor"] = doctor_verdict(adapter)
    metrics["files"] = {"adapter": str(adapter), "metrics": str(out / METRICS_NAME), "plot": str(out / CURVE_NAME),
                        "samples": str(out / SAMPLES_MD)}
    write_json(out / METRICS_NAME, metrics)
    return SftResult(policy, out, history, metrics, held_kept)


def _write_samples(out: Path, held: Sequence[ChatExample], before: Sequence[str], after: Sequence[str]) -> None:
    lines = [json.dumps({"line": e.line, "prompt": e.prompt_messages[-1]["content"], "reference": e.reference,
                         "base": b, "adapter": a}) for e, b, a in zip(held, before, after)]
    atomic_write_text(str(out / SAMPLES_JSONL), "".join(line + "\n" for line in lines))
    parts = ["# Held-out examples: the base model's and the adapter's greedy answers\n"]
    for example, b, a in list(zip(held, before, after))[:SHOWN_SAMPLES]:
        parts.append(f"## line {example.line}\n\n**message**: {example.prompt_messages[-1]['content']}\n\n"
                     f"| | answer |\n|---|---|\n| reference | `{example.reference}` |\n| base | `{_cell(b)}` |\n"
                     f"| adapter | `{_cell(a)}` |\n")
    atomic_write_text(str(out / SAMPLES_MD), "\n".join(parts))


def _cell(text: str) -> str:
    return text.replace("\n", " ").replace("|", "\\|").replace("`", "'") or "(empty)"


def doctor_verdict(adapter: Path) -> str:
    """The precision doctor's one-line verdict on a saved adapter."""
    from loracast.diagnostics import doctor

    report = doctor(adapter)
    adapters = ", ".join(f"{e['adapter_tensors']} {e['dtype']}" for e in report.summary if e.get("adapter_tensors"))
    bases = ", ".join(f"{e['base_layers_stored']} {e['dtype']}" for e in report.summary if e.get("base_layers_stored"))
    problems = [f for f in report.findings if f.severity in ("error", "warning")]
    if not problems:
        return f"no problems found: adapter tensors {adapters or 'none'} on base layers {bases or 'unknown'}"
    worst = problems[0]
    return f"{len(problems)} problem(s); first: [{worst.severity}] {worst.title} (run loracast doctor {adapter})"


def run_sft(options: SftOptions, device: torch.device) -> SftResult:
    """One SFT run with the options' policy, files in `options.out`."""
    train, held = load_sft_data(options)
    return train_sft_once(options, options.precision, train, held, device, options.out)


def compare_sft_precision(options: SftOptions, device: torch.device, policies: Sequence[str] = ("stable", "fast")
                          ) -> list[SftResult]:
    """The same SFT run (same data, order and adapter initialisation) under each policy on a
    half-precision base; files per policy in ``OUT/<policy>/``, a shared plot and metrics in OUT.

    Raises:
        SetupError: the base dtype is float32, where both policies give the same float32 adapters.
    """
    if options.model.dtype == torch.float32 and not options.model.load_in_4bit:
        raise SetupError("--compare-precision needs a half-precision base (both policies give float32 adapters on "
                         "a float32 base): pass --dtype bf16 or --dtype fp16")
    train, held = load_sft_data(options)
    results = []
    for policy in policies:
        results.append(train_sft_once(replace(options, precision=policy), policy, train, held, device,
                                      options.out / policy))
    names = [f"{r.policy} (adapters {'/'.join(r.metrics['adapter_dtypes'])})" for r in results]
    plot_runs(list(zip(names, (r.history for r in results))), options.out / COMPARE_NAME,
              f"{results[0].metrics['model_name']}, base {results[0].metrics['base_dtype']}: precision policies "
              "compared", score_name="held-out exact match")
    write_json(options.out / METRICS_NAME, {"runs": {r.policy: r.metrics for r in results},
                                            "plot": str(options.out / COMPARE_NAME)})
    return results
