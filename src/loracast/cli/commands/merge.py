"""`loracast merge`: fold an adapter into its base and write a plain transformers model."""

from __future__ import annotations

import argparse
import os

from loracast.cli.commands._common import add_command, command_errors, dtype_arg
from loracast.dtypes import dtype_name

EXAMPLES = """\
examples:
  loracast merge ~/models/minilm out/train/adapter out/merged
  loracast merge ./llama-base ./my-adapter ./llama-merged --dtype bf16
  loracast merge SmolLM2-135M-Instruct.Q4_1.gguf out/train/adapter out/merged --dtype bf16

The merged folder loads with transformers' from_pretrained (the auto class matching the adapter's
task type, e.g. AutoModelForSequenceClassification for SEQ_CLS; AutoModelForCausalLM for an LLM,
whose tokenizer and chat template are written too). The printed difference compares the merged
model, read back from OUT, with the unmerged adapter model on a few inputs; for a causal LM, greedy
generations are compared as well. A causal LM's BASE may be a GGUF file.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `merge`."""
    parser = add_command(
        subparsers, "merge", "merge an adapter into its base model and save it (safetensors)",
        "Merge a LoRA adapter into its base model (each weight rounded once) and write the result as a transformers "
        "model folder; print how far the merged outputs are from the unmerged ones.", EXAMPLES)
    parser.add_argument("base", metavar="BASE", help="the base model folder (config.json + weights), or a GGUF file")
    parser.add_argument("adapter", metavar="ADAPTER", help="the adapter folder (adapter_config.json + weights)")
    parser.add_argument("out", metavar="OUT", help="folder to write the merged model to")
    parser.add_argument("--dtype", type=dtype_arg, metavar="fp32|bf16|fp16",
                        help="dtype of the merged weights (default: the base's stored dtype)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Merge, save, compare, print."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with command_errors(value_errors=True):
        from loracast.cli.merge_folder import merge_to_folder

        report = merge_to_folder(args.base, args.adapter, args.out, dtype=args.dtype)
    for note in report.notes:
        print(f"note: {note.splitlines()[0]}")
    dtype = dtype_name(report.dtype)
    print(f"merged model written to {report.out} ({dtype}, safetensors)")
    print(f"merged vs unmerged {report.output_name} on {report.inputs} inputs: max abs diff {report.max_abs_diff:.3g}, "
          f"mean abs diff {report.mean_abs_diff:.3g} (largest |output| {report.max_abs_output:.3g})")
    if report.generations:
        print(f"greedy generations ({report.generations} prompts): {report.generations_equal} of "
              f"{report.generations} equal to the unmerged model's"
              + ("" if report.generations_equal == report.generations else
                 f"; {report.generations - report.generations_equal} differ (the merged weights are rounded once to "
                 f"{dtype}, the unmerged model adds the LoRA branch in its own dtype)"))
    return 0
