"""Which modules a config adapts, by name: PEFT's matching rules and the regexes they build.

A list entry matches a module whose full name equals it or ends with ``"." + entry``; a string is
a regex that must match the full name; `exclude_modules` uses the same rules; `modules_to_save`
names (regex fragments, as PEFT) are never adapted; `layers_pattern` finds the layer index that
`layers_to_transform` keeps; a `rank_pattern`/`alpha_pattern` key matches the end of a name.
`check_patterns` compiles every regex this module will build, so a bad one is refused (naming
its field) when the `LoraConfig` is built rather than when it is applied.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from loracast.config import LoraConfig, register_check
from loracast.errors import ConfigError


def modules_to_save_regex(names: list[str]) -> str:
    """The regex matching module paths that end in one of `names` (regex fragments, as PEFT)."""
    return "|".join(rf"(?:^|.*\.){name}(?:$|\..*)" for name in names)


def layer_index_regex(layers_pattern: str) -> str:
    """The regex capturing the layer index (group `idx`) after the module list `layers_pattern`."""
    return rf"(?:^|.*?\.){layers_pattern}\.(?P<idx>\d+)\."


def pattern_key_regex(key: str) -> str:
    """The regex a `rank_pattern`/`alpha_pattern` key stands for: matching the end of a module path."""
    return rf"(.*\.)?({key})$"


class SuffixSet:
    """Matches a module name equal to one of `names` or ending with "." + one of them (PEFT's
    rule for a list of target names), by set lookups of the name's dotted suffixes."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)

    def fullmatch(self, name: str) -> bool:
        names = self.names
        if name in names:
            return True
        dot = name.find(".")
        while dot != -1:
            if name[dot + 1:] in names:
                return True
            dot = name.find(".", dot + 1)
        return False


class TargetMatcher:
    """Decides, by name, which modules a config adapts; patterns compiled once."""

    def __init__(self, config: LoraConfig) -> None:
        self.config = config
        self._target = self._compile(config.target_modules)
        self._exclude = self._compile(config.exclude_modules) if config.exclude_modules else None
        heads = config.modules_to_save or []
        # unescaped on purpose: PEFT treats these names as regex fragments
        self._saved = re.compile(modules_to_save_regex(heads)) if heads else None
        layers = config.layers_to_transform
        self._layers = None if layers is None else ({layers} if isinstance(layers, int) else set(layers))
        patterns = config.layers_pattern
        if self._layers is not None and not self._layers:
            self._layers = None  # an empty list means every layer, as PEFT
        if self._layers is None:
            self._layer_index = None
        elif not patterns:
            self._layer_index = [re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")]
        else:
            patterns = [patterns] if isinstance(patterns, str) else patterns
            self._layer_index = [re.compile(layer_index_regex(p)) for p in patterns]

    @staticmethod
    def _compile(spec: list[str] | str | None) -> re.Pattern[str] | SuffixSet | None:
        if spec is None:
            return None
        if isinstance(spec, str):
            return re.compile(spec)
        return SuffixSet(spec) if spec else None

    @property
    def inactive(self) -> bool:
        """True when the config targets no modules (target_parameters alone)."""
        return self._target is None

    def matches(self, name: str) -> bool:
        """True when module `name` is to be adapted."""
        if self._exclude is not None and self._exclude.fullmatch(name):
            return False
        if self._saved is not None and self._saved.match(name):
            return False
        if self._target is None or not self._target.fullmatch(name):
            return False
        if self._layer_index is None:
            return True
        for pattern in self._layer_index:
            found = pattern.match(name)
            if found:
                return int(found.group("idx")) in self._layers
        return False


def pattern_value(patterns: dict, name: str, default):
    """The value of the first `patterns` key that matches the end of module `name`, else `default`."""
    for key, value in patterns.items():
        if re.match(pattern_key_regex(key), name):
            return value
    return default


def _expect_regex(name: str, value: Any, regex: str) -> None:
    try:
        re.compile(regex)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        raise ConfigError(name, value, f"a valid regular expression ({exc}); escape special characters "
                          "such as '.' '(' '[' with a backslash") from None


def check_patterns(config: LoraConfig) -> None:
    """Compile every regex the matcher builds from `config`, so a bad one is named.

    Raises:
        ConfigError: a pattern is not a valid regular expression (the field and the fix named).
    """
    if isinstance(config.target_modules, str):
        _expect_regex("target_modules", config.target_modules, config.target_modules)
    if isinstance(config.exclude_modules, str):
        _expect_regex("exclude_modules", config.exclude_modules, config.exclude_modules)
    if config.modules_to_save:
        for name in config.modules_to_save:
            _expect_regex("modules_to_save", name, modules_to_save_regex([name]))
        _expect_regex("modules_to_save", config.modules_to_save, modules_to_save_regex(config.modules_to_save))
    if config.layers_pattern:
        patterns = [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern
        for pattern in patterns:
            _expect_regex("layers_pattern", pattern, layer_index_regex(pattern))
    for name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, name):
            _expect_regex(name, key, pattern_key_regex(key))


register_check(check_patterns)
