"""`LoraConfig`: PEFT's LoRA configuration, field for field, validated on construction.

The JSON layout of `adapter_config.json` is PEFT's, so a file written here loads in PEFT and
the reverse. Options PEFT offers but loracast does not implement are kept as fields (so files
round trip) and refused when set to anything but their default: a config must never be
silently half-applied. Each field is declared once, with `option` (see `loracast.config.spec`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from loracast.config import normalise as norm
from loracast.config import values as accepts
from loracast.config.spec import Support, ValueRow, field_specs, is_default, option
from loracast.errors import ConfigError

CONFIG_NAME = "adapter_config.json"
PEFT_VERSION_WRITTEN = "0.21.2"  # the PEFT release whose file layout we write

SUPPORTED, KEPT, REFUSED = Support.SUPPORTED, Support.KEPT, Support.REFUSED
SAME_AS_PEFT = "same semantics; adapters follow the [precision rules](precision.md#precision-rules)"
INFORMATIONAL = "informational, or meaningful only with a refused option"
FROM_BASE = "decomposed in float64, residual rounded once ([other starts](dora.md#pissa-olora-orthogonal-and-loftq-starts))"
DATA_DRIVEN = "data-driven starts: they need a pass over training data before the adapter exists"
OTHER_METHODS = "other methods on top of LoRA (routing, SVD reparametrisations, variational, ...)"
NOT_IMPLEMENTED = "Not implemented by loracast; must be left at its default."


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """The factor a LoRA update ``B @ A`` is multiplied by: lora_alpha / r, or lora_alpha / sqrt(r)
    with rank-stabilised LoRA (`use_rslora`), as PEFT."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


# Checks that fields whose meaning a higher layer defines are usable, registered by that layer
# (the module-name patterns, compiled by the matcher in `loracast.tuner.match`): this package
# imports nothing above it, yet a bad pattern is refused when the config is built.
CONTRIBUTED_CHECKS: list[Callable[[LoraConfig], None]] = []


def register_check(check: Callable[[LoraConfig], None]) -> None:
    """Run `check(config)` as the last step of every `LoraConfig.validate()`; it raises a
    `ConfigError` naming the field and never changes the config."""
    if check not in CONTRIBUTED_CHECKS:
        CONTRIBUTED_CHECKS.append(check)


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter, with PEFT's field names and defaults.

    Raises:
        ConfigError: a field has the wrong type or value, fields conflict, or a PEFT option
            that loracast does not implement is requested.
    """

    r: int = option(8, check=accepts.rank, note=SAME_AS_PEFT, help="LoRA rank: the inner dimension of B @ A.")
    lora_alpha: float = option(8, check=accepts.finite_number, note=SAME_AS_PEFT,
                               help="Scale numerator: the update is scaled by lora_alpha / r.")
    lora_dropout: float = option(0.0, check=accepts.probability, note=SAME_AS_PEFT,
                                 help="Dropout probability on the LoRA branch input.")
    target_modules: list[str] | str | None = option(
        None, check=accepts.names_or_regex, normalise=norm.unique_names, note=SAME_AS_PEFT,
        help="Modules to adapt: names matched exactly or as a dotted suffix, a regex matched against the "
             "full name, 'all-linear', or None for the model type's default.")
    exclude_modules: list[str] | str | None = option(
        None, check=accepts.names_or_regex, normalise=norm.unique_names, note=SAME_AS_PEFT,
        help="Modules never to adapt, matched like target_modules.")
    fan_in_fan_out: bool = option(False, check=accepts.boolean, note=SAME_AS_PEFT,
                                  help="True when the base stores weight as (in, out), as GPT-2's Conv1D.")
    bias: str = option("none", check=accepts.bias_mode, note=SAME_AS_PEFT,
                       help="Which biases train: 'none', 'all', or 'lora_only' (those of adapted layers).")
    use_rslora: bool = option(False, check=accepts.boolean, note=SAME_AS_PEFT,
                              help="Rank-stabilised scaling lora_alpha / sqrt(r) instead of lora_alpha / r.")
    modules_to_save: list[str] | None = option(
        None, check=accepts.module_names, normalise=norm.as_list, note=SAME_AS_PEFT,
        help="Modules trained in full as a per-adapter copy (e.g. a classification head).")
    init_lora_weights: bool | str = option(
        True, check=accepts.init_weights, note=SAME_AS_PEFT,
        help="True: kaiming A, zero B (no-op at start); 'gaussian': normal A; False: random A and B; 'pissa' / "
             "'pissa_niter_K' / 'olora' / 'loftq': A and B from the base weight, which keeps the residual; "
             "'orthogonal': A and B with B @ A = 0.",
        value_rows=(ValueRow(accepts.PLAIN_INITS, SUPPORTED, SAME_AS_PEFT),
                    ValueRow(accepts.FROM_BASE_INITS, SUPPORTED, FROM_BASE, scope="linear layers"),
                    ValueRow(accepts.DATA_DRIVEN_INITS, REFUSED, DATA_DRIVEN)))
    layers_to_transform: list[int] | int | None = option(None, check=accepts.layer_indices, note=SAME_AS_PEFT,
                                                         help="Only adapt these layer indices.")
    layers_pattern: list[str] | str | None = option(
        None, check=accepts.layer_patterns, note=SAME_AS_PEFT,
        help="Name of the module list holding the layers (e.g. 'layers', 'h'); needs layers_to_transform.")
    rank_pattern: dict = option(check=accepts.pattern_dict(accepts.rank), normalise=norm.dict_or_empty,
                                factory=dict, note=SAME_AS_PEFT, help="Per-module rank overrides: {regex: r}.")
    alpha_pattern: dict = option(check=accepts.pattern_dict(accepts.finite_number), normalise=norm.dict_or_empty,
                                 factory=dict, note=SAME_AS_PEFT, help="Per-module alpha overrides: {regex: alpha}.")
    lora_bias: bool = option(False, check=accepts.boolean, note=SAME_AS_PEFT,
                             help="Give lora_B a bias (changes the base bias on merge).")
    inference_mode: bool = option(False, check=accepts.boolean, note=SAME_AS_PEFT, help="Adapters frozen when True.")
    base_model_name_or_path: str | None = option(None, check=accepts.optional(accepts.string), support=KEPT,
                                                 note=INFORMATIONAL,
                                                 help="Where the base model came from (informational).")
    revision: str | None = option(None, check=accepts.optional(accepts.string), support=KEPT, note=INFORMATIONAL,
                                  help="Base model revision (informational).")
    task_type: str | None = option(None, check=accepts.task_type, note=SAME_AS_PEFT,
                                   help="PEFT task type, e.g. 'CAUSAL_LM' or 'SEQ_CLS'.")
    peft_type: str = option("LORA", check=accepts.peft_type, support=KEPT, note=INFORMATIONAL, help="Always 'LORA'.")
    auto_mapping: dict | None = option(None, check=accepts.optional(accepts.json_object), support=KEPT,
                                       note=INFORMATIONAL, help="PEFT's AutoPeftModel hint (kept, unused).")
    peft_version: str | None = option(PEFT_VERSION_WRITTEN, check=accepts.optional(accepts.string), support=KEPT,
                                      note=INFORMATIONAL, help="PEFT version the file layout follows.")
    megatron_core: str | None = option("megatron.core", check=accepts.optional(accepts.string), support=KEPT,
                                       note=INFORMATIONAL, help="PEFT's Megatron module name (kept, unused).")
    qalora_group_size: int = option(16, check=accepts.integer, support=KEPT, note=INFORMATIONAL,
                                    help="PEFT's QALoRA group size (kept, unused).")
    loftq_config: dict = option(
        check=accepts.loftq_settings, normalise=norm.loftq_dict, factory=dict, scope="linear layers", note=FROM_BASE,
        help="LoftQ settings {'loftq_bits': 4 or 8, 'loftq_iter': n}, used with init_lora_weights='loftq'.")
    target_parameters: list[str] | None = option(
        None, check=accepts.parameter_names, normalise=norm.as_list,
        note="update added in the adapter dtype, rounded once "
             "([below](#lora-on-parameters-target_parameters-moe-experts))",
        help="nn.Parameters to adapt (e.g. the 3-D expert tensors 'mlp.experts.gate_up_proj' of MoE models): "
             "full names or dotted suffixes.")
    trainable_token_indices: list[int] | dict[str, list[int]] | None = option(
        None, check=accepts.token_indices, normalise=norm.token_lists,
        note="rows in the adapter dtype; no per-step copy of the table "
             "([below](#trainable-tokens-trainable_token_indices))",
        help="Train only these rows of the input embedding (a list of token ids), or of the named embeddings "
             "({name: ids}); a head tied to the embedding follows.")
    use_dora: bool = option(
        False, check=accepts.boolean, scope="Linear, Conv1D, Embedding, Conv1d/2d/3d, bitsandbytes 4-bit/8-bit",
        note="weight norm in float32 or wider, merge rounded once ([DoRA](dora.md#dora))",
        help="DoRA: learn a magnitude per output row as well as the low-rank direction.")
    layer_replication: Any = option(
        None, check=accepts.anything, support=REFUSED, help=NOT_IMPLEMENTED,
        note="duplicates base layers (shared weights): changes the model, not the adapter")
    eva_config: Any = option(None, check=accepts.anything, support=REFUSED, note=DATA_DRIVEN, help=NOT_IMPLEMENTED)
    corda_config: Any = option(None, check=accepts.anything, support=REFUSED, note=DATA_DRIVEN, help=NOT_IMPLEMENTED)
    lora_ga_config: Any = option(None, check=accepts.anything, support=REFUSED, note=DATA_DRIVEN,
                                 help=NOT_IMPLEMENTED)
    megatron_config: Any = option(None, check=accepts.anything, support=REFUSED,
                                  note="Megatron tensor-parallel layers", help=NOT_IMPLEMENTED)
    use_qalora: bool = option(False, check=accepts.boolean, support=REFUSED, help=NOT_IMPLEMENTED,
                              note="QALoRA pools the input per quantization group: a different layer")
    alora_invocation_tokens: Any = option(None, check=accepts.anything, support=REFUSED, help=NOT_IMPLEMENTED,
                                          note="aLoRA: activation depends on the tokens of each sequence")
    arrow_config: Any = option(None, check=accepts.anything, support=REFUSED, note=OTHER_METHODS,
                               help=NOT_IMPLEMENTED)
    kasa_config: Any = option(None, check=accepts.anything, support=REFUSED, note=OTHER_METHODS, help=NOT_IMPLEMENTED)
    monteclora_config: Any = option(None, check=accepts.anything, support=REFUSED, note=OTHER_METHODS,
                                    help=NOT_IMPLEMENTED)
    velora_config: Any = option(None, check=accepts.anything, support=REFUSED, note=OTHER_METHODS,
                                help=NOT_IMPLEMENTED)
    use_bdlora: Any = option(None, check=accepts.anything, support=REFUSED, help=NOT_IMPLEMENTED,
                             note="BD-LoRA: block-diagonal factors sharded for tensor parallelism")
    ensure_weight_tying: bool = option(
        False, check=accepts.boolean, support=REFUSED, help=NOT_IMPLEMENTED,
        note="loracast ties trainable tokens of a tied head already; tying LoRA adapters of tied layers is not "
             "implemented")
    # Fields found in a file that this version does not know (newer PEFT); written back unchanged.
    extra_fields: dict = field(default_factory=dict, repr=False, compare=False,
                               metadata={"help": "Unknown fields read from a file, kept for the round trip."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Normalise every field, then check it (types as PEFT declares them, values, conflicts);
        `save_pretrained` calls it again, as fields may have been changed since construction.

        Raises:
            ConfigError: the first invalid field, named with what it accepts.
        """
        self.normalise()
        self.check()

    def normalise(self) -> None:
        """Store each field in its one form (lists for sets and tuples, {} for None, ...): the
        accepted spellings of a setting are the same config. Never raises."""
        for name, (spec, _) in field_specs(type(self)).items():
            if spec.normalise is not None:
                setattr(self, name, spec.normalise(getattr(self, name)))

    def check(self) -> None:
        """Check every field as declared, then the combinations of fields; changes nothing.

        Raises:
            ConfigError: the first invalid field, named with what it accepts.
        """
        for name, (spec, default) in field_specs(type(self)).items():
            value = getattr(self, name)
            spec.check(name, value)
            if spec.support is REFUSED and not is_default(value, default):
                raise ConfigError(name, value, f"{default!r}: loracast does not implement this PEFT option "
                                  f"({spec.note}); remove it or use PEFT for this adapter")
        self._check_combinations()
        for check in CONTRIBUTED_CHECKS:
            check(self)

    def _check_combinations(self) -> None:
        if self.init_lora_weights == "loftq" and not self.loftq_config:
            raise ConfigError("loftq_config", self.loftq_config,
                              "a LoftQConfig (e.g. {'loftq_bits': 4, 'loftq_iter': 1}) with init_lora_weights='loftq'")
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


def unsupported_options(data: dict[str, Any]) -> dict[str, Any]:
    """The options in a PEFT config dict that change the math and that loracast does not
    implement (an initialisation it lacks included): name -> value."""
    found: dict[str, Any] = {}
    for name, (spec, default) in field_specs(LoraConfig).items():
        value = data.get(name, default)
        if spec.support is REFUSED and not is_default(value, default):
            found[name] = value
    if not accepts.init_is_supported(data.get("init_lora_weights", True)):
        found["init_lora_weights"] = data["init_lora_weights"]
    return found
