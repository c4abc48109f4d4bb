"""``--config FILE``: a command's flags read from a YAML (or JSON) file.

Every flag of the command is a key, spelled as the flag without its leading dashes, with dashes
or underscores (``max-steps`` or ``max_steps``). Values go through the flag's own parsing, so a
file accepts exactly what the command line does; a list is joined with commas (for flags such as
``target-modules``); a switch takes ``true`` or ``false``. Flags given on the command line
override the file. An unknown key or a value of the wrong kind is refused, naming the key and the
file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from loracast.cli.command_error import CommandError

CONFIG_DEST = "config"
_NOT_KEYS = frozenset({"help", CONFIG_DEST})


def _actions_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.dest not in _NOT_KEYS
            and action.dest != argparse.SUPPRESS}


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping at the top of the YAML or JSON file `path`.

    Raises:
        CommandError: the file cannot be read, is not YAML, or does not hold a mapping.
    """
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"--config {path}: cannot read it as UTF-8 text ({exc})") from exc
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise CommandError(f"--config {path}: not valid YAML{line}; write one 'key: value' per line") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise CommandError(f"--config {path}: the file must hold a mapping of flags to values (key: value lines), "
                           f"not a {type(values).__name__}")
    return values


def _converted(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise CommandError(f"--config {path}: key {key!r} is a switch; give true or false, not {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if value is None:
        return None
    if isinstance(value, (dict, bool)) and action.type is not None:
        raise CommandError(f"--config {path}: key {key!r} takes a single value, not {value!r}")
    if isinstance(value, list):
        value = ",".join(str(item) for item in value)
    text = str(value)
    try:
        converted = action.type(text) if action.type is not None else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise CommandError(f"--config {path}: key {key!r}: {exc}") from None
    if action.choices is not None and converted not in action.choices:
        allowed = ", ".join(str(c) for c in action.choices)
        raise CommandError(f"--config {path}: key {key!r} is {converted!r}; use one of {allowed}")
    return converted


def config_defaults(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """The values the file `path` sets for `parser`'s flags, parsed as the command line would parse them.

    Raises:
        CommandError: the file is unreadable, a key is not a flag of the command, or a value is wrong.
    """
    actions = _actions_by_key(parser)
    defaults = {}
    for key, value in read_config_file(path).items():
        dest = str(key).lstrip("-").replace("-", "_")
        action = actions.get(dest)
        if action is None:
            raise CommandError(f"--config {path}: unknown key {key!r}; the keys are the flags of "
                               f"'loracast {parser.prog.split()[-1]} --help' without their dashes (e.g. max_steps)")
        defaults[dest] = _converted(action, str(key), value, path)
    return defaults
