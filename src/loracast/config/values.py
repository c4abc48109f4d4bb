"""What each `LoraConfig` field accepts: one check per kind of value.

A check takes the field name and its (already normalised) value and raises a `ConfigError`
naming the field, the value and what it accepts; it never changes the value. The field
declarations in `loracast.config.lora_config` pick one check per field.
"""

from __future__ import annotations

import math
import re
from typing import Any

from loracast.config.spec import Check
from loracast.errors import ConfigError

TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
BIAS_MODES = ("none", "all", "lora_only")
# The `init_lora_weights` values loracast implements, in two groups as their reach differs:
# plain starts work on every layer kind, starts read from the base weight on linear layers.
# "pissa_niter_K" stands for the family PISSA_NITER matches (K an integer).
PLAIN_INITS = (True, False, "gaussian", "orthogonal")
FROM_BASE_INITS = ("pissa", "pissa_niter_K", "olora", "loftq")
PISSA_NITER = re.compile(r"pissa_niter_\d+$")
# PEFT's initialisations that need a pass over training data before the adapter exists.
DATA_DRIVEN_INITS = ("eva", "corda", "lora_ga")

# The largest rank accepted: far above any useful LoRA rank (full rank of the widest layers of
# today's LLMs), and small enough that a damaged file cannot ask for an absurd allocation.
MAX_RANK = 2**16


def init_is_supported(value: Any) -> bool:
    """True for the `init_lora_weights` values loracast implements."""
    if isinstance(value, bool):
        return True
    if not isinstance(value, str):
        return False
    return PISSA_NITER.match(value) is not None or (value != "pissa_niter_K" and value in PLAIN_INITS + FROM_BASE_INITS)


def anything(name: str, value: Any) -> None:
    """Accepts any value (fields PEFT types as its own config classes, checked only for being
    left at their default)."""


def integer(name: str, value: Any) -> None:
    """An int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, "an integer")


def rank(name: str, value: Any) -> None:
    """A LoRA rank: an int in 1..MAX_RANK."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_RANK:
        raise ConfigError(name, value, f"a positive integer rank such as 8 or 16 (at most {MAX_RANK})")


def finite_number(name: str, value: Any) -> None:
    """An int or float (not a bool) that is finite as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, value, "a number")
    try:
        finite = math.isfinite(value)  # an int too large for a float overflows here
    except OverflowError:
        finite = False
    if not finite:
        raise ConfigError(name, value, "a finite number (not NaN, infinity or beyond float range)")


def probability(name: str, value: Any) -> None:
    """A finite number in [0, 1)."""
    finite_number(name, value)
    if not 0.0 <= value < 1.0:
        raise ConfigError(name, value, "a probability in [0, 1)")


def boolean(name: str, value: Any) -> None:
    """True or False (not 0 or 1)."""
    if not isinstance(value, bool):
        raise ConfigError(name, value, "true or false")


def string(name: str, value: Any) -> None:
    """A str."""
    if not isinstance(value, str):
        raise ConfigError(name, value, "a string")


def json_object(name: str, value: Any) -> None:
    """A dict."""
    if not isinstance(value, dict):
        raise ConfigError(name, value, "a JSON object (dict)")


def optional(check: Check) -> Check:
    """`check`, or None."""
    def check_optional(name: str, value: Any) -> None:
        if value is not None:
            check(name, value)
    return check_optional


def bias_mode(name: str, value: Any) -> None:
    """One of BIAS_MODES."""
    string(name, value)
    if value not in BIAS_MODES:
        raise ConfigError(name, value, f"one of {BIAS_MODES}")


def task_type(name: str, value: Any) -> None:
    """None or one of TASK_TYPES."""
    optional(string)(name, value)
    if value is not None and value not in TASK_TYPES:
        raise ConfigError(name, value, f"None or one of {TASK_TYPES}")


def peft_type(name: str, value: Any) -> None:
    """'LORA', the only adapter type loracast reads."""
    string(name, value)
    if value != "LORA":
        raise ConfigError(name, value, "'LORA': loracast reads LoRA adapters only")


def init_weights(name: str, value: Any) -> None:
    """One of the initialisations loracast implements (`init_is_supported`)."""
    if not isinstance(value, (bool, str)):  # 1 == True would pass the value check below
        raise ConfigError(name, value, "True, False or an initialisation name such as 'gaussian' or 'pissa'")
    if not init_is_supported(value):
        names = [repr(v) + (" (K an integer)" if v == "pissa_niter_K" else "") for v in PLAIN_INITS + FROM_BASE_INITS]
        raise ConfigError(name, value, f"{', '.join(names[:-1])} or {names[-1]}; loracast does not implement "
                          "the other PEFT initialisations")


def names_or_regex(name: str, value: Any) -> None:
    """None, a regex string, or a list of module names."""
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(name, value, "a list of module names, a regex string, 'all-linear' or None")


def module_names(name: str, value: Any) -> None:
    """None or a list of module names."""
    if value is not None and (not isinstance(value, list) or not all(isinstance(m, str) for m in value)):
        raise ConfigError(name, value, "a list of module names, or None")


def parameter_names(name: str, value: Any) -> None:
    """None or a list of non-empty parameter names."""
    if value is not None and (not isinstance(value, list) or not all(isinstance(n, str) and n for n in value)):
        raise ConfigError(name, value, "a list of parameter names, or None")


def layer_indices(name: str, value: Any) -> None:
    """None, an int or a list of ints (bools excluded)."""
    if value is None:
        return
    if isinstance(value, bool) or not (isinstance(value, int) or (
            isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value))):
        raise ConfigError(name, value, "an int, a list of ints, or None")


def layer_patterns(name: str, value: Any) -> None:
    """None, a string or a list of strings."""
    if value is not None and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(p, str) for p in value))):
        raise ConfigError(name, value, "a string, a list of strings, or None")


def pattern_dict(value_check: Check) -> Check:
    """A dict from module-name patterns (strings) to values `value_check` accepts."""
    def check_patterns(name: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise ConfigError(name, value, "a dict mapping module-name patterns to numbers")
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(name, value, "string keys (module-name patterns)")
            value_check(f"{name}[{key!r}]", item)
    return check_patterns


def loftq_settings(name: str, value: Any) -> None:
    """A dict of LoftQ settings (PEFT's `LoftQConfig` is turned into one when normalised)."""
    if not isinstance(value, dict):
        raise ConfigError(name, value, "a dict such as {'loftq_bits': 4, 'loftq_iter': 1}")


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def token_indices(name: str, value: Any) -> None:
    """None, a non-empty list of token ids, or a non-empty dict {embedding name: such a list}."""
    if value is None or _token_ids(value):
        return
    if isinstance(value, dict) and value and all(isinstance(k, str) and _token_ids(v) for k, v in value.items()):
        return
    raise ConfigError(name, value, "a non-empty list of token ids, a dict {embedding name: list of ids}, or None")
