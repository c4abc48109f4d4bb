"""The `loracast` command line: a thin argparse front over the library.

Each sub-command lives in its own module in `loracast.cli.commands` and is found by discovery, so
adding a command touches no shared list. A command module provides
``add_parser(subparsers) -> argparse.ArgumentParser`` and sets ``func(args) -> int`` on it.
Errors the user can fix (`CommandError`, and any other `LoracastError`) are printed as one line
with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from loracast._version import __version__
from loracast.errors import LoracastError


class CommandError(LoracastError):
    """A problem with the user's input, reported as one line (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every discovered sub-command."""
    from loracast.cli import commands

    parser = argparse.ArgumentParser(
        prog="loracast",
        description="LoRA fine-tuning with exact, explainable control of numeric precision.",
    )
    parser.add_argument("--version", action="version", version=f"loracast {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except LoracastError as exc:  # CommandError and every other error loracast raises on purpose
        text = str(exc).strip()
        print(f"loracast {args.command}: error: {text.splitlines()[0] if text else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loracast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
