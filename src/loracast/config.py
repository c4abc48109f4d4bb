"""`LoraConfig`: PEFT's LoRA configuration, field for field, validated on construction.

The JSON layout of `adapter_config.json` is PEFT's, so a file written here loads in PEFT and
the reverse. Options PEFT offers but loracast does not implement are kept as fields (so files
round trip) and refused when set to anything but their default: a config must never be
silently half-applied.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from loracast.errors import ConfigError

CONFIG_NAME = "adapter_config.json"
PEFT_VERSION_WRITTEN = "0.21.2"  # the PEFT release whose file layout we write

TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
BIAS_MODES = ("none", "all", "lora_only")
SUPPORTED_INITS = (True, False, "gaussian")

# PEFT fields that change the math and that loracast does not implement, with the value that
# means "not used". A config carrying anything else is refused.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "layer_replication": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "megatron_config": None,
    "target_parameters": None,
    "trainable_token_indices": None,
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
    if data.get("init_lora_weights", True) not in SUPPORTED_INITS:
        found["init_lora_weights"] = data["init_lora_weights"]
    return found


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
        "True: kaiming A, zero B (no-op at start); 'gaussian': normal A; False: random A and B.", True)
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
    # PEFT options loracast refuses unless left at their default (see _UNSUPPORTED_DEFAULTS).
    use_dora: bool = _help("DoRA: learn a magnitude per output row as well (loracast.layers.dora).", False)
    layer_replication: Any = _help("Not implemented by loracast; must be None.", None)
    loftq_config: Any = _help("Not implemented by loracast; must be empty.", factory=dict)
    eva_config: Any = _help("Not implemented by loracast; must be None.", None)
    corda_config: Any = _help("Not implemented by loracast; must be None.", None)
    lora_ga_config: Any = _help("Not implemented by loracast; must be None.", None)
    megatron_config: Any = _help("Not implemented by loracast; must be None.", None)
    target_parameters: Any = _help("Not implemented by loracast; must be None.", None)
    trainable_token_indices: Any = _help("Not implemented by loracast; must be None.", None)
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
        self._check_types()
        self._check_values()
        self._check_unsupported()

    # -- validation -------------------------------------------------------------------------

    def _check_types(self) -> None:
        _expect_int("r", self.r)
        _expect_number("lora_alpha", self.lora_alpha)
        _expect_number("lora_dropout", self.lora_dropout)
        for name in ("fan_in_fan_out", "use_rslora", "lora_bias", "inference_mode", "use_dora"):
            _expect_bool(name, getattr(self, name))
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
        for name, value_check in (("rank_pattern", _expect_int), ("alpha_pattern", _expect_number)):
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
        for name in ("base_model_name_or_path", "revision", "task_type"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(name, value, "a string or None")

    def _check_values(self) -> None:
        if self.r <= 0:
            raise ConfigError("r", self.r, "a positive integer such as 8 or 16")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError("lora_dropout", self.lora_dropout, "a probability in [0, 1)")
        if self.bias not in BIAS_MODES:
            raise ConfigError("bias", self.bias, f"one of {BIAS_MODES}")
        if self.init_lora_weights not in SUPPORTED_INITS:
            raise ConfigError("init_lora_weights", self.init_lora_weights,
                              "True, False or 'gaussian'; loracast does not implement other initialisations yet")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError("task_type", self.task_type, f"None or one of {TASK_TYPES}")
        if self.peft_type != "LORA":
            raise ConfigError("peft_type", self.peft_type, "'LORA': loracast reads LoRA adapters only")
        for name in ("rank_pattern",):
            for key, value in getattr(self, name).items():
                if value <= 0:
                    raise ConfigError(f"{name}[{key!r}]", value, "a positive rank")
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

    # -- derived values ------------------------------------------------------------------------

    def scaling_for(self, r: int, alpha: float) -> float:
        """The factor the LoRA update is multiplied by for a layer of rank `r` and `alpha`."""
        return alpha / (r ** 0.5) if self.use_rslora else alpha / r

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
            raise ConfigError("<root>", type(data).__name__, f"a JSON object in {source}")
        known = {f.name for f in fields(cls)} - {"extra_fields"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if "peft_type" in data and data["peft_type"] != "LORA":
            raise ConfigError("peft_type", data["peft_type"], f"'LORA' in {source}: loracast reads LoRA adapters only")
        if extra:
            warnings.warn(
                f"{source}: fields unknown to loracast were kept unchanged and are not used: {sorted(extra)}",
                UserWarning, stacklevel=3)
        config = cls(**kwargs)
        config.extra_fields = extra
        return config

    def to_json_string(self) -> str:
        """The JSON text written to `adapter_config.json`."""
        data = self.to_dict()
        data["inference_mode"] = True  # as PEFT: a saved adapter is loaded for inference unless asked
        if isinstance(data.get("target_modules"), list):
            data["target_modules"] = sorted(data["target_modules"])
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

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
        with open(file, encoding="utf-8") as handle:
            text = handle.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("<json>", f"line {exc.lineno} column {exc.colno}",
                              f"valid JSON in {file} ({exc.msg})") from None
        return cls.from_dict(data, source=file)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `adapter_config.json` atomically into `save_directory`."""
        from loracast._atomic import atomic_write_text

        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string())


def _expect_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, "an integer")


def _expect_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, value, "a number")


def _expect_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "true or false")


def _names_or_regex(name: str, value: Any) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, set, tuple)) and all(isinstance(v, str) for v in value):
        return list(dict.fromkeys(sorted(value) if isinstance(value, set) else value))
    raise ConfigError(name, value, "a list of module names, a regex string, 'all-linear' or None")
