"""The SFT side of `loracast train`: which job the data and model ask for, and the instruction-
tuning run of a causal LM with its options and printed summary."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from loracast.cli import CommandError
from loracast.training.sft.model import LlmSpec
from loracast.training.sft.settings import EVAL_EXAMPLES, SftSettings

# what the command line fills in where the user gave nothing: read from the job's own settings and model spec
SFT_DEFAULTS = {"lr": SftSettings.lr, "batch_size": SftSettings.batch_size, "max_length": SftSettings.max_length,
                "max_steps": SftSettings.max_steps, "r": LlmSpec.r, "alpha": LlmSpec.alpha, "dropout": LlmSpec.dropout,
                "eval_examples": EVAL_EXAMPLES, "seed": SftSettings.seed, "grad_accum": SftSettings.grad_accum,
                "warmup_ratio": SftSettings.warmup_ratio, "lr_scheduler": SftSettings.lr_scheduler,
                "weight_decay": SftSettings.weight_decay, "max_grad_norm": SftSettings.max_grad_norm,
                "report_to": SftSettings.report_to}


def _is_causal_lm_folder(model: Path) -> bool:
    from loracast.integrations.hf_loading import read_model_config

    if not (model / "config.json").is_file():
        return False  # the classifier path reports what is missing
    architectures = read_model_config(model).get("architectures") or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def is_sft_job(data: Path | None, model: Path | None) -> bool:
    """Whether `loracast train` fine-tunes a causal LM on instruction data (True) or trains a
    classifier (False): the data's format decides; without data, the model's kind.

    Raises:
        CommandError: text/label data with a GGUF model (a causal LM that cannot hold a classifier head).
    """
    from loracast.training.sft.data import data_kind
    from loracast.training.sft.model import is_gguf

    if data is not None:
        kind = data_kind(data)
        if kind == "chat":
            return True
        if kind == "text":  # language modelling for a causal LM; a classifier's rows missing their labels otherwise
            return model is not None and (is_gguf(model) or _is_causal_lm_folder(model))
        if model is not None and is_gguf(model):
            raise CommandError(f"{data} holds text/label rows for a classifier, but {model.name} is a GGUF causal LM; "
                               "give it instruction data (messages or prompt/completion rows), or pass a classifier "
                               "or encoder model folder for text/label data")
        return False
    return model is None or is_gguf(model) or _is_causal_lm_folder(model)


def _value(args: argparse.Namespace, name: str):
    value = getattr(args, name)
    return SFT_DEFAULTS[name] if value is None else value


# the package each tracker of transformers' integrations needs
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "trackio": ("trackio",), "wandb": ("wandb",),
                    "mlflow": ("mlflow",), "comet_ml": ("comet_ml",)}


def _checkpoint_steps(args: argparse.Namespace) -> int | None:
    """The steps between checkpoints, after checking --load-best against --eval-steps and
    --save-steps (both jobs): with --load-best every evaluated adapter must have been saved."""
    if args.load_best and args.eval_steps is None:
        raise CommandError("--load-best picks among the evaluations during training: give --eval-steps N too")
    save_steps = args.save_steps
    if args.load_best and save_steps is None:
        save_steps = args.eval_steps  # the best adapter must have been saved to be restored
    if args.load_best and save_steps % args.eval_steps:
        raise CommandError(f"--load-best needs --save-steps ({save_steps}) to be a multiple of --eval-steps "
                           f"({args.eval_steps}), so that every evaluated adapter is saved")
    return save_steps


def _check_tracker(report_to: str) -> None:
    import importlib.util

    for name in [part.strip() for part in report_to.split(",") if part.strip()]:
        if name in ("none", "all"):
            continue
        packages = TRACKER_PACKAGES.get(name)
        if packages is None:
            raise CommandError(f"--report-to {name}: not a tracker loracast train knows; use none, "
                               f"{', '.join(TRACKER_PACKAGES)}")
        if not any(importlib.util.find_spec(p) is not None for p in packages):
            raise CommandError(f"--report-to {name} needs the {packages[0]} package: pip install {packages[0]}")


def _check_exportable(source: Path, gguf_type: str) -> None:
    """Refuse, before training, an --export-gguf the writer could not produce for this base."""
    from loracast.export.encode import check_type
    from loracast.export.llama import check_folder_config, check_gguf_architecture
    from loracast.export.source import open_gguf, read_gguf_field
    from loracast.integrations.hf_loading import read_model_config
    from loracast.training.sft.model import is_gguf

    check_type(gguf_type)
    if is_gguf(source):
        check_gguf_architecture(str(read_gguf_field(open_gguf(source), "general.architecture")), str(source))
    else:
        check_folder_config(read_model_config(source), str(source))


def _export(result: Any, source: Path, gguf_type: str) -> str:
    """Write the trained model as one GGUF file beside the adapter; the line that reports it."""
    from loracast.export import export_merged_gguf

    out = result.out / f"model-{gguf_type}.gguf"
    report = export_merged_gguf(result.out / "adapter", source, out, gguf_type, overwrite=True)
    return (f"exported: {out} ({gguf_type}; {len(report.reencoded)} adapted tensors merged and rounded once, largest "
            f"error {report.max_abs_error:.3g}; {report.kept + report.converted} other tensors)")


def run_sft_command(args: argparse.Namespace) -> int:
    """Instruction-tune a causal LM as `args` ask; print the summary."""
    from loracast.training.common.runtime import pick_device
    from loracast.training.sft.console import format_sft_comparison, format_sft_run
    from loracast.training.sft.data import default_chat_data_path
    from loracast.training.sft.model import LlmSpec, check_llm_source, default_llm_path
    from loracast.training.sft.run import COMPARE_NAME, SftOptions, compare_sft_precision, run_sft

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and args.compare_precision:
        raise CommandError("--compare-precision trains twice in one process; launch it without torchrun")
    if args.fsdp and processes < 2:
        raise CommandError("--fsdp shards the model across processes, and this is one process; launch with "
                           "torchrun --nproc_per_node N (N >= 2), or drop --fsdp")
    quantize = args.quantize
    if args.load_in_4bit:
        if quantize not in (None, "nf4"):
            raise CommandError(f"--load-in-4bit is --quantize nf4 (bitsandbytes); it cannot go with --quantize {quantize}")
        quantize = "nf4"
    if quantize == "nf4":
        try:
            __import__("bitsandbytes")
        except ImportError as exc:
            raise CommandError("--quantize nf4 needs bitsandbytes (pip install 'loracast[bnb]'); --quantize int4 "
                               "quantizes with torchao instead") from exc
    if args.fsdp and quantize in ("int8", "int4"):
        raise CommandError(f"--fsdp with --quantize {quantize}: FSDP does not shard torchao's quantized weights here; "
                           "use --quantize nf4 (bitsandbytes, stored in the compute dtype) or leave out --fsdp")
    policy = args.precision
    if args.fsdp and quantize == "nf4" and policy != "fsdp":
        # QLoRA under FSDP: storage, compute and adapter dtypes must be one dtype for FSDP to shard them together
        if os.environ.get("RANK", "0") == "0":
            print(f"loracast train: --fsdp with --load-in-4bit uses the fsdp precision policy (not {policy}): 4-bit "
                  "storage, compute and adapters in one dtype", file=sys.stderr)
        policy = "fsdp"
    if args.labels is not None:
        raise CommandError("--labels applies to text/label data; instruction data has no label set")
    try:
        __import__("matplotlib")
    except ImportError as exc:
        raise CommandError("the training plot needs matplotlib: pip install 'loracast[demo]'") from exc
    data = args.data if args.data is not None else default_chat_data_path()
    source = check_llm_source(args.model if args.model is not None else default_llm_path())
    template = None
    if args.chat_template is not None:
        try:
            template = args.chat_template.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"--chat-template {args.chat_template}: cannot read it as UTF-8 text ({exc})") from exc
    targets = None if args.target_modules is None else [t.strip() for t in args.target_modules.split(",") if t.strip()]
    spec = LlmSpec(source=source, dtype=args.dtype if args.dtype is not None else torch.bfloat16,
                   load_in_4bit=quantize == "nf4", torchao=quantize if quantize in ("int8", "int4") else None,
                   target_modules="all-linear" if targets in (None, ["all-linear"]) else targets,
                   r=_value(args, "r"), alpha=_value(args, "alpha"), dropout=_value(args, "dropout"),
                   gradient_checkpointing=args.gradient_checkpointing, chat_template=template,
                   attention=args.attention, fsdp=args.fsdp)
    max_steps = args.max_steps if args.max_steps is not None or args.epochs is not None else SFT_DEFAULTS["max_steps"]
    if args.fsdp and args.load_best:
        raise CommandError("--load-best with --fsdp: restoring the best adapter into a sharded model is not supported "
                           "yet; leave out --load-best (the checkpoints and evaluations stay) or --fsdp")
    _check_tracker(args.report_to)
    save_steps = _checkpoint_steps(args)
    settings = SftSettings(max_steps=max_steps, epochs=args.epochs or 1, lr=_value(args, "lr"),
                           batch_size=_value(args, "batch_size"), max_length=_value(args, "max_length"),
                           seed=args.seed, max_new_tokens=args.max_new_tokens, grad_accum=args.grad_accum,
                           warmup_ratio=args.warmup_ratio, lr_scheduler=args.lr_scheduler,
                           weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                           eval_steps=args.eval_steps, save_steps=save_steps,
                           save_total_limit=args.save_total_limit, load_best=args.load_best,
                           report_to=args.report_to, packing=args.packing)
    options = SftOptions(model=spec, data=data, out=args.out, precision=policy,
                         eval_fraction=args.eval_fraction, eval_examples=_value(args, "eval_examples"),
                         settings=settings, resume=args.resume, fsdp=args.fsdp)
    if args.export_gguf is not None:
        if args.compare_precision:
            raise CommandError("--export-gguf exports one run; leave out --compare-precision, or export a chosen "
                               "run's adapter with loracast export")
        _check_exportable(source, args.export_gguf)
    pick_device(args.device)  # a device that cannot be used fails here, in one line
    device = args.device
    if args.compare_precision:
        results = compare_sft_precision(options, device)
        for result in results:
            print(f"\n== {result.policy} ==\n{format_sft_run(result)}")
        print("\n" + format_sft_comparison(results, str(args.out / COMPARE_NAME)))
    else:
        result = run_sft(options, device)
        if result is not None:  # the main process reports
            print(format_sft_run(result))
            if args.export_gguf is not None:
                print(_export(result, source, args.export_gguf))
    return 0
