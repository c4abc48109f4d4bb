"""`loracast doctor PATH [--base MODEL] [--json]`: the precision doctor on the command line.

Exit status: 0 when no error was found, 1 when errors were found, 2 when the input could not
be read (one line on stderr says why).
"""

from __future__ import annotations

import argparse
import shutil
import sys

from loracast.cli import CommandError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `doctor` sub-command."""
    parser = subparsers.add_parser(
        "doctor", help="check the precision of a saved adapter (or a model folder)",
        description="Report the dtype of every adapter tensor and base layer of a saved adapter, and what is "
                    "wrong with them: mixed or float16 adapters, non-finite values, quantization and FSDP "
                    "conflicts, a save or load environment that differs from training. Exit status: 0 no "
                    "error, 1 errors found, 2 input unreadable.")
    parser.add_argument("path", help="adapter folder written by save_pretrained (loracast or PEFT), or a "
                                     "local transformers model folder")
    parser.add_argument("--base", metavar="MODEL", help="local transformers model folder to load the adapter into, "
                                                        "to check it as it would be used")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--fsdp", action="store_true", help="run the FSDP checks (as if training with FSDP)")
    parser.add_argument("--full", action="store_true", help="one table row per module (no grouping by layer)")
    parser.add_argument("--plain", action="store_true", help="plain text table even when rich is installed")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the doctor and print its report; returns the exit status."""
    from loracast.diagnostics import UnreadableInput, doctor

    try:
        report = doctor(args.path, base=args.base, fsdp=True if args.fsdp else None)
    except UnreadableInput as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print(report.to_json())
    else:
        width = max(80, min(shutil.get_terminal_size((120, 24)).columns, 160))
        sys.stdout.write(report.render(rich=False if args.plain else None, full=args.full, width=width,
                                       color=sys.stdout.isatty()))
    return report.exit_status
