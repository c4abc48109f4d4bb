"""A complete training run: build, train, evaluate, and write the adapter, metrics.json and the
plot; and the same run under two precision policies side by side.

Files of a run in OUT: ``adapter/`` (PEFT's files plus ``labels.json``), ``metrics.json``,
``training_curve.png``. A comparison writes one such folder per policy under OUT, plus
``OUT/metrics.json`` (every run) and ``OUT/compare_precision.png``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from loracast._atomic import atomic_write_text
from loracast._version import __version__
from loracast.training.data import LabelledTexts
from loracast.training.loop import History, LoopSettings, train_classifier
from loracast.training.plot import plot_runs
from loracast.training.report import precision_summary, reset_peak_memory
from loracast.training.runtime import Runtime
from loracast.training.setup import ModelSpec, SetupError, base_dtype_name, build_classifier, display_name, load_data

ADAPTER_DIR = "adapter"
METRICS_NAME = "metrics.json"
CURVE_NAME = "training_curve.png"
COMPARE_NAME = "compare_precision.png"
LABELS_NAME = "labels.json"


@dataclass
class TrainOptions:
    """Everything `loracast train` can be asked for."""

    model: ModelSpec
    data: Path | None = None  # None: the shipped support-ticket dataset
    out: Path = Path("out/train")
    precision: str = "stable"
    labels: list[str] | None = None  # fixes the label set and order
    eval_fraction: float = 0.2  # held out when the data has no split column
    loop: LoopSettings = field(default_factory=LoopSettings)


@dataclass
class RunResult:
    """A finished run: where its files are and what it measured."""

    policy: str
    out: Path
    history: History
    metrics: dict[str, Any]


def prepare_out(out: Path) -> Path:
    """Create the output folder.

    Raises:
        SetupError: `out` is an existing file, or cannot be created.
    """
    if out.exists() and not out.is_dir():
        raise SetupError(f"--out {str(out)!r} is a file; pass a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SetupError(f"cannot create output folder {str(out)!r}: {exc.strerror or exc}") from exc
    return out


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` as indented JSON, atomically."""
    atomic_write_text(str(path), json.dumps(payload, indent=2, sort_keys=False) + "\n")


def train_once(options: TrainOptions, policy: str, train: LabelledTexts, held_out: LabelledTexts, data_path: Path,
               runtime: Runtime, out: Path) -> RunResult:
    """Train one adapter under `policy` and (on the main process) write its files into `out`."""
    reset_peak_memory(runtime.device)
    began = time.perf_counter()
    peft_model, tokenizer = build_classifier(options.model, train.label_names, policy, runtime.device)
    loaded = time.perf_counter()
    if runtime.is_main:
        print(f"{policy}: {display_name(options.model.folder)} (base {base_dtype_name(peft_model)}) on {data_path.name}: "
              f"{len(train)} train / {len(held_out)} held-out rows, {len(train.label_names)} labels, "
              f"device {runtime.device}", file=sys.stderr)
    history, optimizer = train_classifier(peft_model, tokenizer, train, held_out, options.loop, runtime,
                                          label=policy)
    trained = time.perf_counter()
    summary = precision_summary(peft_model, optimizer, history, policy, runtime.device)
    config = peft_model.peft_config["default"]
    metrics = {
        "loracast_version": __version__,
        "model": str(options.model.folder),
        "model_name": display_name(options.model.folder),
        "data": str(data_path),
        "labels": train.label_names,
        "policy": policy,
        "base_dtype": base_dtype_name(peft_model),
        "adapter_dtypes": summary["parameters"].get("adapters", {}).get("dtypes", {}),
        "lora": {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                 "target_modules": sorted(config.target_modules) if isinstance(config.target_modules, (set, list))
                 else config.target_modules, "modules_to_save": config.modules_to_save},
        "train": {**asdict(options.loop), "examples": len(train), "steps": len(history.steps),
                  "processes": runtime.world_size},
        "eval": {"examples": len(held_out), "accuracy_before": history.accuracy_before,
                 "accuracy_after": history.accuracy_after},
        "diverged_at_step": history.diverged_at_step,
        "precision_summary": summary,
        "seconds": {"load": loaded - began, "train": trained - loaded},
        "history": history.to_dict(),
    }
    if runtime.is_main:
        prepare_out(out)
        adapter = out / ADAPTER_DIR
        peft_model.save_pretrained(adapter)
        write_json(adapter / LABELS_NAME, {"labels": train.label_names})
        plot_runs([(policy, history)], out / CURVE_NAME, _title(options, policy, metrics))
        metrics["files"] = {"adapter": str(adapter), "metrics": str(out / METRICS_NAME),
                            "plot": str(out / CURVE_NAME)}
        write_json(out / METRICS_NAME, metrics)
    return RunResult(policy, out, history, metrics)


def _title(options: TrainOptions, policy: str, metrics: dict[str, Any]) -> str:
    return (f"{metrics['model_name']}: LoRA r={options.model.r}, policy {policy}, base {metrics['base_dtype']}, "
            f"adapters {'/'.join(metrics['adapter_dtypes']) or '?'}")


def run_training(options: TrainOptions, runtime: Runtime) -> RunResult:
    """One run with the options' policy, files in `options.out`."""
    if runtime.is_main:
        prepare_out(options.out)
    train, held_out, data_path = load_data(options.data, options.labels, options.eval_fraction, options.loop.seed)
    return train_once(options, options.precision, train, held_out, data_path, runtime, options.out)


def compare_precision(options: TrainOptions, runtime: Runtime, policies: Sequence[str] = ("stable", "fast")
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
    if runtime.is_main:
        prepare_out(options.out)
    train, held_out, data_path = load_data(options.data, options.labels, options.eval_fraction, options.loop.seed)
    results = [train_once(options, policy, train, held_out, data_path, runtime, options.out / policy)
               for policy in policies]
    if runtime.is_main:
        names = [f"{r.policy} (adapters {'/'.join(r.metrics['adapter_dtypes'])})" for r in results]
        plot_runs(list(zip(names, (r.history for r in results))), options.out / COMPARE_NAME,
                  f"{results[0].metrics['model_name']}, base {results[0].metrics['base_dtype']}: precision policies "
                  "compared")
        write_json(options.out / METRICS_NAME, {"runs": {r.policy: r.metrics for r in results},
                                                "plot": str(options.out / COMPARE_NAME)})
    return results
