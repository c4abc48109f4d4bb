"""Helpers shared by the sub-commands: argument types and turning library errors into one-line
`CommandError`s (exit status 2, no traceback)."""

from __future__ import annotations

import argparse
import contextlib
import textwrap
from collections.abc import Iterator

import torch

from loracast.cli import CommandError
from loracast.dtypes import parse_dtype
from loracast.errors import LoracastError


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number greater than 0")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number of at least 0")
    return value


def fraction(text: str) -> float:
    """argparse type: a number from 0 to 1 (1 excluded)."""
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 0 and below 1")
    return value


def dtype_arg(text: str) -> torch.dtype:
    """argparse type: fp32, bf16 or fp16 (or their long names)."""
    try:
        dtype = parse_dtype(text, "--dtype")
    except LoracastError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise argparse.ArgumentTypeError(f"{text!r}: use fp32, bf16 or fp16")
    return dtype


def add_command(subparsers: argparse._SubParsersAction, name: str, summary: str, description: str,
                examples: str) -> argparse.ArgumentParser:
    """A sub-command parser whose --help ends with `examples` (kept as written)."""
    return subparsers.add_parser(name, help=summary, description=textwrap.fill(description, 88), epilog=examples,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


@contextlib.contextmanager
def command_errors(value_errors: bool = False) -> Iterator[None]:
    """Re-raise the errors a user can fix (bad paths, bad data, bad files, missing packages) as
    `CommandError` with their first line; anything else is a bug and keeps its traceback.

    `value_errors`: also treat a plain `ValueError` as the user's (for library calls that
    document ValueError for bad arguments, such as an output path that is a file).
    """
    # every error loracast raises on purpose is a LoracastError: bad data, files, set-up, precision, ...
    user_errors = (LoracastError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
    try:
        yield
    except CommandError:
        raise
    except user_errors as exc:
        raise CommandError(_first_line(exc)) from exc
    except ValueError as exc:
        if value_errors and type(exc) is ValueError:
            raise CommandError(_first_line(exc)) from exc
        raise
    except ImportError as exc:
        package = exc.name or "a package"
        raise CommandError(f"{package} is not installed: pip install 'loracast[demo]' (or the package itself)") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    return text.splitlines()[0] if text else type(exc).__name__
