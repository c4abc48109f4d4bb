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
from loracast.cli.command_error import CommandError
from loracast.errors import LoracastError

__all__ = ["CommandError", "build_parser", "main"]


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


def _command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def _with_config_file(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                      args: argparse.Namespace) -> argparse.Namespace:
    """`args` parsed again with the --config file's values as defaults (the command line wins)."""
    from loracast.cli.config_file import config_defaults

    command = _command_parser(parser, args.command)
    command.set_defaults(**config_defaults(command, args.config))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        if getattr(args, "config", None) is not None:
            args = _with_config_file(parser, argv, args)
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
