"""A complete classifier run on transformers' trainer: build, evaluate, train, evaluate, and write
the adapter, metrics.json and the plot; and the same run under two precision policies side by side.

Files of a run in OUT: ``adapter/`` (PEFT's files plus ``labels.json``), ``metrics.json``,
``training_curve.png``; with ``--save-steps``, ``checkpoints/checkpoint-N`` (adapter-only, complete
or ignored: see `common.checkpoints`). A comparison writes one such folder per policy under OUT,
plus ``OUT/metrics.json`` (every run) and ``OUT/compare_precision.png``. Under several processes
every process trains, and the main one alone writes and prints.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from loracast._version import __version__
from loracast.distributed.runtime import launched_world_size
from loracast.training.classify.data import LabelledTexts, load_data
from loracast.training.classify.engine import ClassifierTrainer, steps_per_epoch
from loracast.training.classify.metrics import (
    ClassifyMetrics,
    EvalSummary,
    Files,
    LoraSummary,
    Seconds,
    TrainSummary,
)
from loracast.training.classify.model import ModelSpec, build_classifier, display_name
from loracast.training.classify.settings import EVAL_FRACTION, ClassifySettings
from loracast.training.common import checkpoints
from loracast.training.common.errors import SetupError
from loracast.training.common.files import (
    ADAPTER_DIR,
    COMPARE_NAME,
    CURVE_NAME,
    METRICS_NAME,
    prepare_out,
    write_json,
)
from loracast.training.common.history import History
from loracast.training.common.model import base_dtype_name
from loracast.training.common.plot import plot_runs
from loracast.training.common.report import precision_summary, reset_peak_memory

LABELS_NAME = "labels.json"


@dataclass
class TrainOptions:
    """Everything `loracast train classify` can be asked for."""

    model: ModelSpec
    data: Path | None = None  # None: the shipped support-ticket dataset
    out: Path = Path("out/train")
    precision: str = "stable"
    labels: list[str] | None = None  # fixes the label set and order
    eval_fraction: float = EVAL_FRACTION
    settings: ClassifySettings = field(default_factory=ClassifySettings)
    resume: str | None = None  # "latest", or a checkpoint folder; None: start afresh


@dataclass
class RunResult:
    """A finished run: where its files are and what it measured."""

    policy: str
    out: Path
    metrics: ClassifyMetrics

    @property
    def history(self) -> History:
        """Every step and evaluation of the run."""
        return self.metrics.history


def training_arguments(options: TrainOptions, out: Path, steps_per_epoch: int, device: str = "auto") -> Any:
    """transformers' `TrainingArguments` for the run: the loop's settings, checkpoints in
    ``OUT/checkpoints``, the device (under torchrun or accelerate, this process's). Without
    ``eval_steps`` the run evaluates ``evals_per_epoch`` times an epoch of `steps_per_epoch` steps."""
    from transformers import TrainingArguments

    settings = options.settings
    use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    eval_steps = settings.eval_steps or max(1, -(-steps_per_epoch // max(1, settings.evals_per_epoch)))
    save = settings.save_steps is not None
    return TrainingArguments(
        output_dir=str(out / checkpoints.CHECKPOINTS_DIR),
        per_device_train_batch_size=settings.batch_size, per_device_eval_batch_size=settings.batch_size * 2,
        gradient_accumulation_steps=settings.grad_accum, learning_rate=settings.lr,
        weight_decay=settings.weight_decay, lr_scheduler_type=settings.lr_scheduler, warmup_steps=settings.warmup_ratio,
        max_steps=settings.max_steps if settings.max_steps is not None else -1,
        num_train_epochs=settings.epochs, max_grad_norm=settings.max_grad_norm, seed=settings.seed,
        logging_strategy="steps", logging_steps=1, disable_tqdm=True, report_to=settings.report_to,
        save_strategy="steps" if save else "no", save_steps=settings.save_steps or 500, save_total_limit=None,
        eval_strategy="steps", eval_steps=eval_steps,
        load_best_model_at_end=settings.load_best, metric_for_best_model="eval_accuracy",
        greater_is_better=True, use_cpu=use_cpu, remove_unused_columns=False, ddp_find_unused_parameters=False,
        dataloader_num_workers=0, bf16=False, fp16=False, optim="adamw_torch")


def run_identity(options: TrainOptions, policy: str, data: Path, labels: Sequence[str]) -> checkpoints.RunIdentity:
    """What a checkpoint of this run records, and a resumed run must repeat (keyed by the flag that sets it)."""
    spec = options.model
    targets = spec.target_modules if isinstance(spec.target_modules, str) else sorted(spec.target_modules or [])
    return checkpoints.RunIdentity({
        "--model": str(Path(spec.folder).resolve()), "--data": str(Path(data).resolve()), "--labels": list(labels),
        "--precision": policy, "--dtype": str(spec.dtype).removeprefix("torch.") if spec.dtype else "auto",
        "--load-in-4bit": spec.load_in_4bit, "--r": spec.r, "--alpha": float(spec.alpha),
        "--dropout": float(spec.dropout), "--target-modules": targets,
        "--max-length": options.settings.max_length, "--seed": options.settings.seed})


def train_once(options: TrainOptions, policy: str, train: LabelledTexts, held_out: LabelledTexts, data_path: Path,
               out: Path, device: str = "auto") -> RunResult | None:
    """Train one adapter under `policy` on transformers' trainer and write its files into `out`
    (the main process; the others return None)."""
    settings = options.settings
    per_epoch = steps_per_epoch(len(train), settings, launched_world_size())
    args = training_arguments(options, out, per_epoch, device)  # joins the process group under torchrun
    main = args.process_index == 0
    run_device = args.device
    root = out / checkpoints.CHECKPOINTS_DIR
    identity = run_identity(options, policy, data_path, train.label_names)
    resume_from = checkpoints.resume_point(root, options.resume, identity) if options.resume else None
    if main:
        prepare_out(out)
    reset_peak_memory(run_device)
    began = time.perf_counter()
    peft_model, tokenizer = build_classifier(options.model, train.label_names, policy, run_device)
    loaded = time.perf_counter()
    if main:
        processes = f", {args.world_size} processes" if args.world_size > 1 else ""
        print(f"{policy}: {display_name(options.model.folder)} (base {base_dtype_name(peft_model)}) on {data_path.name}: "
              f"{len(train)} train / {len(held_out)} held-out rows, {len(train.label_names)} labels, "
              f"device {run_device.type}{processes}", file=sys.stderr)
    trainer = ClassifierTrainer(peft_model, args, tokenizer=tokenizer, train=train, held_out=held_out,
                                settings=settings, identity=identity, label=policy)
    before = trainer.evaluate_held_out(0)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    history = trainer.history()
    step = trainer.state.global_step
    if history.evals and history.evals[-1].step == step and not settings.load_best:
        after = history.evals[-1]  # the trainer evaluated the final adapter already
    else:
        after = trainer.evaluate_held_out(step)
        history.evals.append(after)
    history.evals.insert(0, before)
    trained = time.perf_counter()
    if not main:
        return None
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()  # the trainer makes its output folder under several processes even when it saves nothing
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    summary = precision_summary(peft_model, optimizer, history, policy, run_device)
    config = peft_model.peft_config["default"]
    metrics = ClassifyMetrics(
        loracast_version=__version__, model=str(options.model.folder), model_name=display_name(options.model.folder),
        data=str(data_path), labels=train.label_names, policy=policy, base_dtype=base_dtype_name(peft_model),
        adapter_dtypes=summary["parameters"].get("adapters", {}).get("dtypes", {}),
        lora=LoraSummary(config.r, config.lora_alpha, config.lora_dropout,
                         sorted(config.target_modules) if isinstance(config.target_modules, (set, list))
                         else config.target_modules, config.modules_to_save),
        train=TrainSummary(settings, len(train), len(history.steps), args.world_size,
                           settings.batch_size * settings.grad_accum * args.world_size,
                           str(resume_from) if resume_from is not None else None),
        eval=EvalSummary(len(held_out), before.accuracy, after.accuracy, trainer.state.best_model_checkpoint),
        precision_summary=summary, seconds=Seconds(loaded - began, trained - loaded), history=history)
    adapter = out / ADAPTER_DIR
    peft_model.save_pretrained(adapter)
    write_json(adapter / LABELS_NAME, {"labels": train.label_names})
    plot_runs([(policy, history)], out / CURVE_NAME,
              f"{metrics.model_name}: LoRA r={config.r}, policy {policy}, base {metrics.base_dtype}, "
              f"adapters {'/'.join(metrics.adapter_dtypes) or '?'}")
    metrics.files = Files(str(adapter), str(out / METRICS_NAME), str(out / CURVE_NAME),
                          str(root) if root.is_dir() else None)
    write_json(out / METRICS_NAME, metrics.to_dict())
    return RunResult(policy, out, metrics)


def run_training(options: TrainOptions, device: str = "auto") -> RunResult | None:
    """One run with the options' policy, files in `options.out` (None on processes other than the main one)."""
    train, held_out, data_path = load_data(options.data, options.labels, options.eval_fraction, options.settings.seed)
    return train_once(options, options.precision, train, held_out, data_path, options.out, device)


def compare_precision(options: TrainOptions, device: str = "auto", policies: Sequence[str] = ("stable", "fast")
                      ) -> list[RunResult]:
    """The same run (same data, seed and head initialisation) under each policy; files per policy in
    ``OUT/<policy>/``, and a shared plot and metrics file in OUT. The base is bfloat16 unless
    another dtype is given.

    Raises:
        SetupError: the base dtype is float32, where both policies give the same float32 adapters.
    """
    if options.model.dtype is None:
        options = replace(options, model=replace(options.model, dtype=torch.bfloat16))
    if options.model.dtype == torch.float32 and not options.model.load_in_4bit:
        raise SetupError("--compare-precision needs a half-precision base (both policies give float32 adapters on "
                         "a float32 base): pass --dtype bf16 or --dtype fp16")
    prepare_out(options.out)
    train, held_out, data_path = load_data(options.data, options.labels, options.eval_fraction, options.settings.seed)
    results = [train_once(options, policy, train, held_out, data_path, options.out / policy, device)
               for policy in policies]
    finished = [r for r in results if r is not None]
    names = [f"{r.policy} (adapters {'/'.join(r.metrics.adapter_dtypes)})" for r in finished]
    plot_runs(list(zip(names, (r.history for r in finished))), options.out / COMPARE_NAME,
              f"{finished[0].metrics.model_name}, base {finished[0].metrics.base_dtype}: precision policies compared")
    write_json(options.out / METRICS_NAME, {"runs": {r.policy: r.metrics.to_dict() for r in finished},
                                            "plot": str(options.out / COMPARE_NAME)})
    return finished
