"""`loracast convert`: rewrite an adapter's weights in another dtype, or a trusted pickle adapter
as safetensors."""

from __future__ import annotations

import argparse
import sys
import warnings

from loracast.cli import CommandError
from loracast.cli.commands._common import add_command, command_errors, dtype_arg
from loracast.dtypes import dtype_name

EXAMPLES = """\
examples:
  loracast convert out/train/adapter out/adapter-bf16 --dtype bf16
  loracast convert ./my-adapter ./my-adapter-fp16 --dtype fp16     (refused if a value exceeds 65504)
  loracast convert ./old-peft-adapter ./adapter --allow-pickle      (adapter_model.bin -> .safetensors)

Loading a converted adapter still gives the adapter dtypes of the precision rules (fp32 by
default on a half-precision base); the file only stores the values in DTYPE.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `convert`."""
    parser = add_command(
        subparsers, "convert", "rewrite an adapter in bf16, fp16 or fp32",
        "Rewrite a saved adapter's weights in another dtype and report the rounding error and the size change. "
        "Conversion to fp16 is refused when a value would overflow. With --allow-pickle, a PEFT adapter saved as "
        "adapter_model.bin (a pickle file) is read, with torch.load(weights_only=True), and written as safetensors.",
        EXAMPLES)
    parser.add_argument("adapter", metavar="ADAPTER", help="the adapter folder (adapter_config.json + weights)")
    parser.add_argument("out", metavar="OUT", help="folder to write the converted adapter to (may be ADAPTER)")
    parser.add_argument("--dtype", type=dtype_arg, metavar="bf16|fp16|fp32",
                        help="dtype to store the weights in (default: keep each tensor's dtype)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read adapter_model.bin (pickle; only from a source you trust) when there is no "
                             "adapter_model.safetensors")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Convert and report."""
    if args.dtype is None and not args.allow_pickle:
        raise CommandError("nothing to do: pass --dtype bf16|fp16|fp32 to change the dtype, or --allow-pickle to turn "
                           "a trusted adapter_model.bin into safetensors")
    with command_errors(value_errors=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        from loracast.files.convert import convert_adapter

        report = convert_adapter(args.adapter, args.out, args.dtype, allow_pickle=args.allow_pickle)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    source = ", ".join(f"{name} ({count:,} values)" for name, count in report.source_dtypes.items())
    dtype = "safetensors, dtypes kept" if report.dtype is None else dtype_name(report.dtype)
    change = report.bytes_after / report.bytes_before if report.bytes_before else float("nan")
    print(f"converted {report.tensors} tensors from {source} to {dtype}: {report.out}")
    print(f"rounding error: max abs {report.max_abs_error:.3g}, relative (||delta|| / ||x||) "
          f"{report.relative_error:.3g}, max relative {report.max_relative_error:.3g}; "
          f"{report.flushed_to_zero:,} non-zero values flushed to zero")
    print(f"size: {report.bytes_before:,} -> {report.bytes_after:,} bytes ({change:.2f}x)")
    return 0
