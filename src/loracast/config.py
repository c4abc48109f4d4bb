"""`LoraConfig`: PEFT's LoRA configuration, field for field, validated on construction.

The JSON layout of `adapter_config.json` is PEFT's, so a file written here loads in PEFT and
the reverse. Options PEFT offers but loracast does not implement are kept as fields (so files
round trip) and refused when set to anything but their default: a config must never be
silently half-applied.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from loracast.errors import ConfigError

CONFIG_NAME = "adapter_config.json"
PEFT_VERSION_WRITTEN = "0.21.2"  # the PEFT release whose file layout we write

TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
BIAS_MODES = ("none", "all", "lora_only")
SUPPORTED_INITS = (True, False, "gaussian", "pissa", "olora", "orthogonal", "loftq")  # and "pissa_niter_K"
_PISSA_NITER = re.compile(r"pissa_niter_\d+$")


def init_is_supported(value: Any) -> bool:
    """True for the `init_lora_weights` values loracast implements."""
    if isinstance(value, str) and _PISSA_NITER.match(value):
        return True
    return any(value is v or (isinstance(v, str) and value == v) for v in SUPPORTED_INITS)

# PEFT fields that change the math and that loracast does not implement, with the value that
# means "not used". A config carrying anything else is refused.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "layer_replication": None,
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "megatron_config": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "kasa_config": None,
    "monteclora_config": None,
    "velora_config": None,
    "use_bdlora": None,
    "ensure_weight_tying": False,
}


def unsupported_options(data: dict[str, Any]) -> dict[str, Any]:
    """The options in a PEFT config dict that change the math and that loracast does not
    implement (an initialisation other than SUPPORTED_INITS included): name -> value."""
    found: dict[str, Any] = {}
    for name, default in _UNSUPPORTED_DEFAULTS.items():
        value = data.get(name, default)
        if value != default and not (default == {} and value is None):
            found[name] = value
    if not init_is_supported(data.get("init_lora_weights", True)):
        found["init_lora_weights"] = data["init_lora_weights"]
    return found


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """The factor a LoRA update ``B @ A`` is multiplied by: lora_alpha / r, or lora_alpha / sqrt(r)
    with rank-stabilised LoRA (`use_rslora`), as PEFT."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _help(text: str, default: Any = None, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter, with PEFT's field names and defaults.

    Raises:
        ConfigError: a field has the wrong type or value, fields conflict, or a PEFT option
            that loracast does not implement is requested.
    """

    r: int = _help("LoRA rank: the inner dimension of B @ A.", 8)
    lora_alpha: float = _help("Scale numerator: the update is scaled by lora_alpha / r.", 8)
    lora_dropout: float = _help("Dropout probability on the LoRA branch input.", 0.0)
    target_modules: list[str] | str | None = _help(
        "Modules to adapt: names matched exactly or as a dotted suffix, a regex matched against the "
        "full name, 'all-linear', or None for the model type's default.", None)
    exclude_modules: list[str] | str | None = _help(
        "Modules never to adapt, matched like target_modules.", None)
    fan_in_fan_out: bool = _help("True when the base stores weight as (in, out), as GPT-2's Conv1D.", False)
    bias: str = _help("Which biases train: 'none', 'all', or 'lora_only' (those of adapted layers).", "none")
    use_rslora: bool = _help("Rank-stabilised scaling lora_alpha / sqrt(r) instead of lora_alpha / r.", False)
    modules_to_save: list[str] | None = _help(
        "Modules trained in full as a per-adapter copy (e.g. a classification head).", None)
    init_lora_weights: bool | str = _help(
        "True: kaiming A, zero B (no-op at start); 'gaussian': normal A; False: random A and B; 'pissa' / "
        "'pissa_niter_K' / 'olora' / 'loftq': A and B from the base weight, which keeps the residual; "
        "'orthogonal': A and B with B @ A = 0.", True)
    layers_to_transform: list[int] | int | None = _help("Only adapt these layer indices.", None)
    layers_pattern: list[str] | str | None = _help(
        "Name of the module list holding the layers (e.g. 'layers', 'h'); needs layers_to_transform.", None)
    rank_pattern: dict = _help("Per-module rank overrides: {regex: r}.", factory=dict)
    alpha_pattern: dict = _help("Per-module alpha overrides: {regex: alpha}.", factory=dict)
    lora_bias: bool = _help("Give lora_B a bias (changes the base bias on merge).", False)
    inference_mode: bool = _help("Adapters frozen when True.", False)
    base_model_name_or_path: str | None = _help("Where the base model came from (informational).", None)
    revision: str | None = _help("Base model revision (informational).", None)
    task_type: str | None = _help("PEFT task type, e.g. 'CAUSAL_LM' or 'SEQ_CLS'.", None)
    peft_type: str = _help("Always 'LORA'.", "LORA")
    auto_mapping: dict | None = _help("PEFT's AutoPeftModel hint (kept, unused).", None)
    peft_version: str | None = _help("PEFT version the file layout follows.", PEFT_VERSION_WRITTEN)
    megatron_core: str | None = _help("PEFT's Megatron module name (kept, unused).", "megatron.core")
    qalora_group_size: int = _help("PEFT's QALoRA group size (kept, unused).", 16)
    loftq_config: dict = _help(
        "LoftQ settings {'loftq_bits': 4 or 8, 'loftq_iter': n}, used with init_lora_weights='loftq'.", factory=dict)
    target_parameters: list[str] | None = _help(
        "nn.Parameters to adapt (e.g. the 3-D expert tensors 'mlp.experts.gate_up_proj' of MoE models): full "
        "names or dotted suffixes.", None)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = _help(
        "Train only these rows of the input embedding (a list of token ids), or of the named embeddings "
        "({name: ids}); a head tied to the embedding follows.", None)
    # PEFT options loracast refuses unless left at their default (see _UNSUPPORTED_DEFAULTS).
    use_dora: bool = _help("DoRA: learn a magnitude per output row as well (loracast.layers.dora).", False)
    layer_replication: Any = _help("Not implemented by loracast; must be None.", None)
    eva_config: Any = _help("Not implemented by loracast; must be None.", None)
    corda_config: Any = _help("Not implemented by loracast; must be None.", None)
    lora_ga_config: Any = _help("Not implemented by loracast; must be None.", None)
    megatron_config: Any = _help("Not implemented by loracast; must be None.", None)
    use_qalora: bool = _help("Not implemented by loracast; must be False.", False)
    alora_invocation_tokens: Any = _help("Not implemented by loracast; must be None.", None)
    arrow_config: Any = _help("Not implemented by loracast; must be None.", None)
    kasa_config: Any = _help("Not implemented by loracast; must be None.", None)
    monteclora_config: Any = _help("Not implemented by loracast; must be None.", None)
    velora_config: Any = _help("Not implemented by loracast; must be None.", None)
    use_bdlora: Any = _help("Not implemented by loracast; must be None.", None)
    ensure_weight_tying: bool = _help("Not implemented by loracast; must be False.", False)
    # Fields found in a file that this version does not know (newer PEFT); written back unchanged.
    extra_fields: dict = field(default_factory=dict, repr=False, compare=False,
                               metadata={"help": "Unknown fields read from a file, kept for the round trip."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (types as PEFT declares them, values, conflicts); `save_pretrained`
        calls it again, as fields may have been changed since construction.

        Raises:
            ConfigError: the first invalid field, named with what it accepts.
        """
        self._check_types()
        self._check_values()
        self._check_unsupported()
        self._check_patterns()

    # -- validation -------------------------------------------------------------------------

    def _check_types(self) -> None:
        for name, check in FIELD_CHECKS.items():
            check(name, getattr(self, name))
        self.target_modules = _names_or_regex("target_modules", self.target_modules)
        self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, (set, tuple)):
                self.modules_to_save = list(self.modules_to_save)
            if not isinstance(self.modules_to_save, list) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise ConfigError("modules_to_save", self.modules_to_save, "a list of module names, or None")
        if self.layers_to_transform is not None:
            lt = self.layers_to_transform
            if isinstance(lt, bool) or not (isinstance(lt, int) or (
                    isinstance(lt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in lt))):
                raise ConfigError("layers_to_transform", lt, "an int, a list of ints, or None")
        if self.layers_pattern is not None and not (
                isinstance(self.layers_pattern, str)
                or (isinstance(self.layers_pattern, list) and all(isinstance(p, str) for p in self.layers_pattern))):
            raise ConfigError("layers_pattern", self.layers_pattern, "a string, a list of strings, or None")
        for name, value_check in (("rank_pattern", _expect_rank), ("alpha_pattern", _expect_finite_number)):
            pattern = getattr(self, name)
            if pattern is None:
                setattr(self, name, {})
                continue
            if not isinstance(pattern, dict):
                raise ConfigError(name, pattern, "a dict mapping module-name patterns to numbers")
            for key, value in pattern.items():
                if not isinstance(key, str):
                    raise ConfigError(name, pattern, "string keys (module-name patterns)")
                value_check(f"{name}[{key!r}]", value)
        if self.loftq_config is None:
            self.loftq_config = {}
        if not isinstance(self.loftq_config, dict):
            to_dict = getattr(self.loftq_config, "__dict__", None)  # PEFT's LoftQConfig dataclass
            if not isinstance(to_dict, dict):
                raise ConfigError("loftq_config", self.loftq_config, "a dict such as {'loftq_bits': 4, 'loftq_iter': 1}")
            self.loftq_config = dict(to_dict)
        if self.target_parameters is not None:
            names = self.target_parameters
            if isinstance(names, (set, tuple)):
                names = list(names)
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise ConfigError("target_parameters", self.target_parameters, "a list of parameter names, or None")
            self.target_parameters = names
        self.trainable_token_indices = _token_indices(self.trainable_token_indices)

    def _check_values(self) -> None:
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError("lora_dropout", self.lora_dropout, "a probability in [0, 1)")
        if self.bias not in BIAS_MODES:
            raise ConfigError("bias", self.bias, f"one of {BIAS_MODES}")
        if not init_is_supported(self.init_lora_weights):
            raise ConfigError("init_lora_weights", self.init_lora_weights,
                              "True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K an integer), 'olora', "
                              "'orthogonal' or 'loftq'; loracast does not implement the other PEFT initialisations")
        if self.init_lora_weights == "loftq" and not self.loftq_config:
            raise ConfigError("loftq_config", self.loftq_config,
                              "a LoftQConfig (e.g. {'loftq_bits': 4, 'loftq_iter': 1}) with init_lora_weights='loftq'")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError("task_type", self.task_type, f"None or one of {TASK_TYPES}")
        if self.peft_type != "LORA":
            raise ConfigError("peft_type", self.peft_type, "'LORA': loracast reads LoRA adapters only")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("layers_to_transform", self.layers_to_transform,
                              "None when target_modules is a regex string (put the layer filter in the regex)")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError("layers_pattern", self.layers_pattern,
                              "None when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_to_transform", None, "set together with layers_pattern")
        if self.use_dora and self.lora_bias:
            raise ConfigError("lora_bias", True, "False when use_dora=True (DoRA does not support lora_bias, as in PEFT)")

    def _check_unsupported(self) -> None:
        found = unsupported_options({name: getattr(self, name) for name in _UNSUPPORTED_DEFAULTS})
        for name, value in found.items():
            raise ConfigError(
                name, value,
                f"{_UNSUPPORTED_DEFAULTS[name]!r}: loracast does not implement this PEFT option yet; "
                "remove it or use PEFT for this adapter")

    def _check_patterns(self) -> None:
        # every regex the injection compiles, compiled here first, so a bad one is named
        if isinstance(self.target_modules, str):
            _expect_regex("target_modules", self.target_modules, self.target_modules)
        if isinstance(self.exclude_modules, str):
            _expect_regex("exclude_modules", self.exclude_modules, self.exclude_modules)
        if self.modules_to_save:
            for name in self.modules_to_save:
                _expect_regex("modules_to_save", name, modules_to_save_regex([name]))
            _expect_regex("modules_to_save", self.modules_to_save, modules_to_save_regex(self.modules_to_save))
        if self.layers_pattern:
            patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            for pattern in patterns:
                _expect_regex("layers_pattern", pattern, layer_index_regex(pattern))
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, name):
                _expect_regex(name, key, pattern_key_regex(key))

    # -- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The config as PEFT writes it to `adapter_config.json` (unknown fields included)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra_fields":
                continue
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        out.update(copy.deepcopy(self.extra_fields))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> LoraConfig:
        """Build a config from a PEFT-style dict; unknown fields are kept with a warning.

        Raises:
            ConfigError: a field has the wrong type or value (the message names it).
        """
        if not isinstance(data, dict):
            raise ConfigError("<root>", type(data).__name__, "a JSON object", source=source)
        known = {f.name for f in fields(cls)} - {"extra_fields"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if "peft_type" in data and data["peft_type"] != "LORA":
            raise ConfigError("peft_type", data["peft_type"], "'LORA': loracast reads LoRA adapters only", source=source)
        if extra:
            warnings.warn(
                f"{source}: fields unknown to loracast were kept unchanged and are not used: {sorted(extra)}",
                UserWarning, stacklevel=3)
        try:
            config = cls(**kwargs)
        except ConfigError as exc:
            raise exc.in_file(source) from None
        config.extra_fields = extra
        return config

    def to_json_string(self) -> str:
        """The JSON text written to `adapter_config.json`, the fields validated first.

        Raises:
            ConfigError: a field is invalid or cannot be written as JSON (e.g. a numpy number).
        """
        self.validate()
        data = self.to_dict()
        data["inference_mode"] = True  # as PEFT: a saved adapter is loaded for inference unless asked
        if isinstance(data.get("target_modules"), list):
            data["target_modules"] = sorted(data["target_modules"])
        try:
            return json.dumps(data, indent=2, sort_keys=True) + "\n"
        except (TypeError, ValueError) as exc:  # only extra_fields can still hold such values
            raise ConfigError("extra_fields", self.extra_fields,
                              f"values JSON can hold (strings, numbers, booleans, lists, dicts, None): {exc}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LoraConfig:
        """Read `adapter_config.json` from a folder (or the file itself).

        Raises:
            FileNotFoundError: no config at `path`.
            ConfigError: the JSON is malformed or a field is invalid.
        """
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"no {CONFIG_NAME} at {path!r}: pass the folder written by save_pretrained (loracast or PEFT)")
        with open(file, "rb") as handle:
            return cls.from_json(handle.read(), source=file)

    @classmethod
    def from_json(cls, raw: bytes | str, source: str = "config") -> LoraConfig:
        """Build a config from the text of an `adapter_config.json` (UTF-8 bytes or a string).

        Raises:
            ConfigError: the text is not UTF-8 JSON holding an object, or a field is invalid
                (the message names `source` and the field).
        """
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            raise ConfigError("<file>", f"byte {exc.start}", "UTF-8 text; the file is damaged or not a config, "
                              "save the adapter again", source=source) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("<json>", f"line {exc.lineno} column {exc.colno}",
                              f"valid JSON ({exc.msg})", source=source) from None
        except (ValueError, RecursionError) as exc:  # an integer of over 4300 digits, or nesting too deep
            raise ConfigError("<json>", type(exc).__name__, f"JSON a parser can read ({exc})", source=source) from None
        return cls.from_dict(data, source=source)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `adapter_config.json` atomically into `save_directory`."""
        from loracast._atomic import atomic_write_text

        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string())


# The largest rank accepted: far above any useful LoRA rank (full rank of the widest layers of
# today's LLMs), and small enough that a damaged file cannot ask for an absurd allocation.
MAX_RANK = 2**16


def _expect_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, "an integer")


def _expect_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_RANK:
        raise ConfigError(name, value, f"a positive integer rank such as 8 or 16 (at most {MAX_RANK})")


def _expect_finite_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, value, "a number")
    try:
        finite = math.isfinite(value)  # an int too large for a float overflows here
    except OverflowError:
        finite = False
    if not finite:
        raise ConfigError(name, value, "a finite number (not NaN, infinity or beyond float range)")


def _expect_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "true or false")


def _expect_str(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError(name, value, "a string")


def _expect_init(name: str, value: Any) -> None:
    if not isinstance(value, (bool, str)):  # 1 == True would pass the value check below
        raise ConfigError(name, value, "True, False or an initialisation name such as 'gaussian' or 'pissa'")


def _optional(check: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    def check_optional(name: str, value: Any) -> None:
        if value is not None:
            check(name, value)
    return check_optional


def _expect_dict(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise ConfigError(name, value, "a JSON object (dict)")


# Type of each plain field as PEFT declares it, unused ones included (a file must not carry
# `qalora_group_size: false` unnoticed). Fields with structure (module lists, patterns, layer
# indices) are checked in `_check_types`; a new plain field adds one line here.
FIELD_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "r": _expect_rank,
    "lora_alpha": _expect_finite_number,
    "lora_dropout": _expect_finite_number,
    "fan_in_fan_out": _expect_bool,
    "use_rslora": _expect_bool,
    "lora_bias": _expect_bool,
    "inference_mode": _expect_bool,
    "bias": _expect_str,
    "init_lora_weights": _expect_init,
    "peft_type": _expect_str,
    "base_model_name_or_path": _optional(_expect_str),
    "revision": _optional(_expect_str),
    "task_type": _optional(_expect_str),
    "auto_mapping": _optional(_expect_dict),
    "peft_version": _optional(_expect_str),
    "megatron_core": _optional(_expect_str),
    "qalora_group_size": _expect_int,
    "use_dora": _expect_bool,
    "use_qalora": _expect_bool,
    "ensure_weight_tying": _expect_bool,
}


def modules_to_save_regex(names: list[str]) -> str:
    """The regex matching module paths that end in one of `names` (regex fragments, as PEFT)."""
    return "|".join(rf"(?:^|.*\.){name}(?:$|\..*)" for name in names)


def layer_index_regex(layers_pattern: str) -> str:
    """The regex capturing the layer index (group `idx`) after the module list `layers_pattern`."""
    return rf"(?:^|.*?\.){layers_pattern}\.(?P<idx>\d+)\."


def pattern_key_regex(key: str) -> str:
    """The regex a `rank_pattern`/`alpha_pattern` key stands for: matching the end of a module path."""
    return rf"(.*\.)?({key})$"


def _expect_regex(name: str, value: Any, regex: str) -> None:
    try:
        re.compile(regex)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        raise ConfigError(name, value, f"a valid regular expression ({exc}); escape special characters "
                          "such as '.' '(' '[' with a backslash") from None


def _token_indices(value: Any) -> list[int] | dict[str, list[int]] | None:
    def ids(v: Any) -> list[int] | None:
        if isinstance(v, (list, tuple)) and v and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                      for i in v):
            return list(v)
        return None

    if value is None:
        return None
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        checked = {k: ids(v) for k, v in value.items()}
        if all(v is not None for v in checked.values()):
            return checked
    elif ids(value) is not None:
        return ids(value)
    raise ConfigError("trainable_token_indices", value,
                      "a non-empty list of token ids, a dict {embedding name: list of ids}, or None")


def _names_or_regex(name: str, value: Any) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, set, tuple)) and all(isinstance(v, str) for v in value):
        return list(dict.fromkeys(sorted(value) if isinstance(value, set) else value))
    raise ConfigError(name, value, "a list of module names, a regex string, 'all-linear' or None")
