"""A complete SFT run of a causal LM: build, train, evaluate before and after, and write the
adapter, metrics.json, the plot and the before/after samples; and the same run under two precision
policies side by side.

Files of a run in OUT: ``adapter/`` (PEFT's files, the fingerprint inside, plus ``sft.json``:
how prompts were built, read by ``loracast generate``), ``metrics.json``, ``training_curve.png``,
``samples.md`` (a few held-out examples, base and adapter answers side by side) and
``samples.jsonl`` (every held-out answer); with ``--save-steps``, ``checkpoints/checkpoint-N``
(adapter-only, complete or ignored: see `checkpoints`). These files are written once training has
finished, each atomically; a run that fails early leaves at most its complete checkpoints.
Under several processes every process trains, and the main one alone writes and prints.
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
from loracast.training.common import checkpoints
from loracast.training.common.errors import DataError, SetupError
from loracast.training.common.files import ADAPTER_DIR, COMPARE_NAME, CURVE_NAME, METRICS_NAME, prepare_out, write_json
from loracast.training.common.history import EvalRecord
from loracast.training.common.model import base_dtype_name
from loracast.training.common.plot import plot_runs
from loracast.training.common.report import peak_memory, precision_summary, reset_peak_memory
from loracast.training.sft.data import ChatExample, read_chat_examples, split_chat_examples
from loracast.training.sft.engine import Evaluation, SftHistory, SftTrainer
from loracast.training.sft.model import LlmSpec, build_sft_model, llm_display_name, load_llm_tokenizer
from loracast.training.sft.packing import isolates_packed_examples, pack
from loracast.training.sft.recompute import restore_modules
from loracast.training.sft.settings import EVAL_EXAMPLES, SftSettings
from loracast.training.sft.template import check_template, encode_all

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
    eval_examples: int | None = EVAL_EXAMPLES  # cap on held-out examples evaluated (the first N); None: all
    settings: SftSettings = field(default_factory=SftSettings)
    resume: str | None = None  # "latest", or a checkpoint folder; None: start afresh
    fsdp: bool = False  # FSDP2 across the processes instead of DDP
    doctor_at_start: bool = True  # print the precision doctor's verdict on the model before step 1


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


def training_arguments(options: SftOptions, out: Path, device: str = "auto") -> Any:
    """transformers' `TrainingArguments` for the run: the loop's settings, checkpoints in
    ``OUT/checkpoints``, the device (under torchrun or accelerate, this process's)."""
    from transformers import TrainingArguments

    settings = options.settings
    use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    evaluate = settings.eval_steps is not None
    save = settings.save_steps is not None
    return TrainingArguments(
        output_dir=str(out / checkpoints.CHECKPOINTS_DIR),
        per_device_train_batch_size=settings.batch_size, per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, learning_rate=settings.lr,
        weight_decay=settings.weight_decay, lr_scheduler_type=settings.lr_scheduler, warmup_steps=settings.warmup_ratio,
        max_steps=settings.max_steps if settings.max_steps is not None else -1,
        num_train_epochs=settings.epochs, max_grad_norm=settings.max_grad_norm, seed=settings.seed,
        logging_strategy="steps", logging_steps=1, disable_tqdm=True, report_to=settings.report_to,
        save_strategy="steps" if save else "no", save_steps=settings.save_steps or 500, save_total_limit=None,
        eval_strategy="steps" if evaluate else "no", eval_steps=settings.eval_steps,
        load_best_model_at_end=settings.load_best, metric_for_best_model="eval_exact_match",
        greater_is_better=True, use_cpu=use_cpu, remove_unused_columns=False, ddp_find_unused_parameters=False,
        dataloader_num_workers=0, bf16=False, fp16=False)


def run_identity(options: SftOptions, policy: str, base_dtype: str) -> checkpoints.RunIdentity:
    """What a checkpoint of this run records, and a resumed run must repeat (keyed by the flag that sets it)."""
    spec = options.model
    targets = spec.target_modules if isinstance(spec.target_modules, str) else sorted(spec.target_modules or [])
    return checkpoints.RunIdentity({
        "--model": str(Path(spec.source).resolve()), "--data": str(Path(options.data).resolve()),
        "--precision": policy, "--dtype": base_dtype,
        "--quantize": (spec.quantization or {}).get("kind"), "--r": spec.r, "--alpha": float(spec.alpha),
        "--dropout": float(spec.dropout), "--target-modules": targets, "--max-length": options.settings.max_length,
        "--seed": options.settings.seed, "--fsdp": options.fsdp})


def train_sft_once(options: SftOptions, policy: str, train: list[ChatExample], held: list[ChatExample],
                   device: str, out: Path) -> SftResult | None:
    """Train one adapter under `policy` on transformers' trainer and write its files into `out`
    (the main process; the others return None)."""
    args = training_arguments(options, out, device)  # joins the process group under torchrun
    main = args.process_index == 0
    run_device = args.device
    reset_peak_memory(run_device)
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
    root = out / checkpoints.CHECKPOINTS_DIR
    base_dtype = str(options.model.dtype).removeprefix("torch.") if options.model.dtype is not None else "auto"
    identity = run_identity(options, policy, base_dtype)
    resume_from = checkpoints.resume_point(root, options.resume, identity) if options.resume else None
    if main:
        prepare_out(out)
    torch.manual_seed(settings.seed)  # the adapters' initial values: the same for every policy
    model = build_sft_model(options.model, policy, run_device, tokenizer)
    loaded = time.perf_counter()
    peaks = {"load": peak_memory(run_device)["bytes"]}  # the peak so far, after each phase: where it comes from
    train_rows: list[Any] = list(train_encoded)
    if settings.packing:
        if not isolates_packed_examples(model, train_encoded, run_device):
            raise SetupError(f"--packing: {llm_display_name(options.model.source)} lets packed examples attend to "
                             "each other (its attention does not restart at each example's positions); leave out "
                             "--packing")
        train_rows = pack(train_encoded, settings.max_length)
    name = llm_display_name(options.model.source)
    verdict = model_verdict(model) if main and options.doctor_at_start else None
    if options.fsdp:
        _shard(model, resume_from)
    trainer = SftTrainer(model, args, tokenizer=tokenizer, train=train_rows, held_out=held_kept,
                         held_out_encoded=held_encoded, settings=settings, identity=identity, label=policy,
                         sharded=model if options.fsdp else None)
    processes = f", {args.world_size} processes" if args.world_size > 1 else ""
    if main:
        quantized = options.model.quantization
        torchao = f", torchao {quantized['kind']} weights" if quantized and quantized["backend"] == "torchao" else ""
        print(f"{policy}: {name} (base {base_dtype_name(model)}{torchao}) on {options.data.name}: {len(train_encoded)} train / "
              f"{len(held_kept)} held-out conversations, device {run_device.type}{processes}", file=sys.stderr)
        if settings.packing:
            print(f"{policy}: packed {len(train_encoded)} examples into {len(train_rows)} rows of at most "
                  f"{settings.max_length} tokens", file=sys.stderr)
        if skipped_train or skipped_held:
            print(f"{policy}: skipped {skipped_train} train and {skipped_held} held-out examples longer than "
                  f"--max-length {settings.max_length} tokens", file=sys.stderr)
        if verdict is not None:
            print(f"{policy}: doctor before step 1: {verdict}", file=sys.stderr)
    before = _before_evaluation(trainer, root, resume_from is not None, main)
    peaks["evaluation before"] = peak_memory(run_device)["bytes"]
    trainer.evaluations.clear()
    train_began = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    finally:
        recomputed = restore_modules(model)  # the model's own modules again, for what comes after training
    trained = time.perf_counter()
    peaks["training"] = peak_memory(run_device)["bytes"]
    after = trainer.evaluate_held_out(trainer.state.global_step)
    peaks["evaluation after"] = peak_memory(run_device)["bytes"]
    history = trainer.history()
    history.evaluations = [before, *trainer.evaluations]  # the last one is `after`
    history.evals = [EvalRecord(0, before.score.exact, before.loss), *history.evals,
                     EvalRecord(after.step, after.score.exact, after.loss)]
    adapter = out / ADAPTER_DIR
    if options.fsdp:  # every process takes part in gathering the shards; the main one writes
        model.save_pretrained(adapter, is_main_process=main)
    if not main:
        return None
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    summary = precision_summary(model, optimizer, history, policy, run_device)
    config = model.peft_config["default"]
    metrics = {
        "loracast_version": __version__,
        "task": "sft",
        "model": str(options.model.source),
        "model_name": name,
        "data": source,
        "policy": policy,
        "base_dtype": base_dtype_name(model),
        "quantization": options.model.quantization,
        "adapter_dtypes": summary["parameters"].get("adapters", {}).get("dtypes", {}),
        "lora": {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                 "target_modules": sorted(config.target_modules) if isinstance(config.target_modules, (set, list))
                 else config.target_modules},
        "train": {**asdict(settings), "examples": len(train_encoded), "skipped_too_long": skipped_train,
                  "steps": len(history.steps), "processes": args.world_size, "rows": len(train_rows),
                  "global_batch": settings.batch_size * settings.grad_accum * args.world_size,
                  "resumed_from": str(resume_from) if resume_from is not None else None,
                  "gradient_checkpointing": options.model.gradient_checkpointing,
                  "attention": getattr(model.config, "_attn_implementation", None),
                  "recomputed_in_backward": recomputed.to_dict(),
                  "head_on_labelled_positions_only": history.head_on_labelled_only,
                  "tokens_per_second": history.tokens_per_second()},
        "eval": {"examples": len(held_kept), "skipped_too_long": skipped_held, "before": before.to_dict(),
                 "after": after.to_dict(), "best_checkpoint": trainer.state.best_model_checkpoint,
                 "evaluations": [e.to_dict() for e in history.evaluations]},
        "diverged_at_step": history.diverged_at_step,
        "precision_summary": summary,
        "peak_memory_after": peaks,
        # training time leaves out the evaluations during training; "eval" counts every evaluation
        "seconds": {"load": loaded - began,
                    "train": trained - train_began - sum(e.seconds for e in history.evaluations[1:-1]),
                    "eval": sum(e.seconds for e in history.evaluations)},
        "history": history.to_dict(),
    }
    if not options.fsdp:
        model.save_pretrained(adapter)
    write_json(adapter / SFT_NAME, {"system": _common_system_prompt(train), "plain": all(e.plain for e in train),
                                    "max_new_tokens": settings.max_new_tokens, "model": str(options.model.source)})
    plot_runs([(policy, history)], out / CURVE_NAME,
              f"{name}: LoRA r={config.r}, policy {policy}, base {metrics['base_dtype']}, adapters "
              f"{'/'.join(metrics['adapter_dtypes']) or '?'}", score_name="held-out exact match")
    _write_samples(out, held_kept, before.answers, after.answers)
    metrics["doctor"] = doctor_verdict(adapter)
    metrics["files"] = {"adapter": str(adapter), "metrics": str(out / METRICS_NAME), "plot": str(out / CURVE_NAME),
                        "samples": str(out / SAMPLES_MD), "checkpoints": str(root) if root.is_dir() else None}
    write_json(out / METRICS_NAME, metrics)
    return SftResult(policy, out, history, metrics, held_kept)


def _shard(model: Any, resume_from: Path | None) -> None:
    """Shard the transformers model inside `model` with FSDP2 (one unit per decoder block), on
    every process; a resumed checkpoint's adapter is loaded first (loading needs whole tensors)."""
    from loracast.distributed.fsdp import shard_model
    from loracast.training.trainers.adapter_mixin import load_adapter_checkpoint

    if resume_from is not None:
        load_adapter_checkpoint(model.get_base_model(), str(resume_from))
    shard_model(model.get_base_model())


BEFORE_NAME = "before.json"  # in OUT/checkpoints: the evaluation before step 1, for a resumed run's report


def _before_evaluation(trainer: SftTrainer, root: Path, resumed: bool, main: bool) -> Evaluation:
    saved = root / BEFORE_NAME
    if resumed and saved.is_file():
        payload = json.loads(saved.read_text(encoding="utf-8"))
        return Evaluation.from_dict(payload["evaluation"], payload["answers"])
    before = trainer.evaluate_held_out(0)
    if main and trainer.settings.save_steps is not None:
        root.mkdir(parents=True, exist_ok=True)
        write_json(saved, {"evaluation": before.to_dict(), "answers": before.answers})
    return before


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

    return _verdict(doctor(adapter), f"loracast doctor {adapter}")


def model_verdict(model: Any) -> str:
    """The precision doctor's one-line verdict on a model about to train."""
    from loracast.diagnostics import doctor

    return _verdict(doctor(model), "loracast.doctor(model) for the whole report")


def _verdict(report: Any, more: str) -> str:
    adapters = ", ".join(f"{e['adapter_tensors']} {e['dtype']}" for e in report.summary if e.get("adapter_tensors"))
    bases = ", ".join(f"{e['base_layers_stored']} {e['dtype']}" for e in report.summary if e.get("base_layers_stored"))
    problems = [f for f in report.findings if f.severity in ("error", "warning")]
    if not problems:
        return f"no problems found: adapter tensors {adapters or 'none'} on base layers {bases or 'unknown'}"
    worst = problems[0]
    return f"{len(problems)} problem(s); first: [{worst.severity}] {worst.title} ({more})"


def run_sft(options: SftOptions, device: str = "auto") -> SftResult | None:
    """One SFT run with the options' policy, files in `options.out` (None on processes other than the main one)."""
    train, held = load_sft_data(options)
    return train_sft_once(options, options.precision, train, held, device, options.out)


def compare_sft_precision(options: SftOptions, device: str = "auto", policies: Sequence[str] = ("stable", "fast")
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
