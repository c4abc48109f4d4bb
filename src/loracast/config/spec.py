"""The declaration of one `LoraConfig` field: default, check, support and help, written once.

Each field of `LoraConfig` is declared with `option(...)`. The dataclass field, its help text
(PEFT's `metadata={"help": ...}`), its validation, the list of refused PEFT options and the
README's table of supported and refused fields are all read from that declaration, so they
cannot disagree.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Check = Callable[[str, Any], None]
Normalise = Callable[[Any], Any]


class Support(enum.Enum):
    """What loracast does with a PEFT field."""

    SUPPORTED = "supported"  # implemented, with PEFT's meaning
    KEPT = "kept"  # carried through files unchanged; informational or unused by the math
    REFUSED = "refused"  # not implemented: any value but the default is a ConfigError


@dataclass(frozen=True)
class ValueRow:
    """Some values of one field that share a support status: a row of the README's table
    (e.g. the `init_lora_weights` starts that work on linear layers only)."""

    values: tuple[Any, ...]
    support: Support
    note: str
    scope: str = ""


@dataclass(frozen=True)
class FieldSpec:
    """Everything declared about one `LoraConfig` field.

    Attributes:
        check: raises a `ConfigError` when the (normalised) value is not accepted.
        support: supported, kept or refused (see `Support`).
        help: one line for users, as PEFT's field help.
        note: the README table's "why / how it differs from PEFT" for this field.
        scope: where a supported field works when not everywhere (e.g. "linear layers").
        normalise: brings an accepted spelling to the one stored form; never rejects.
        value_rows: table rows for values whose support differs from the field's own.
    """

    check: Check
    support: Support
    help: str
    note: str = ""
    scope: str = ""
    normalise: Normalise | None = None
    value_rows: tuple[ValueRow, ...] = ()


def option(default: Any = None, *, check: Check, help: str, support: Support = Support.SUPPORTED, note: str = "",
           scope: str = "", normalise: Normalise | None = None, factory: Callable[[], Any] | None = None,
           value_rows: tuple[ValueRow, ...] = ()) -> Any:
    """A dataclass field carrying its `FieldSpec` (under metadata "spec") and its help (under
    "help", where PEFT keeps it); `factory` instead of `default` for a mutable default."""
    spec = FieldSpec(check=check, support=support, help=help, note=note, scope=scope, normalise=normalise,
                     value_rows=value_rows)
    metadata = {"help": help, "spec": spec}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_specs(cls: type) -> dict[str, tuple[FieldSpec, Any]]:
    """Field name -> (its spec, its default) for every field of dataclass `cls` declared with
    `option`, in declaration order."""
    found = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("spec")
        if spec is not None:
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            found[f.name] = (spec, default)
    return found


def is_default(value: Any, default: Any) -> bool:
    """True when `value` means the same as a refused field's `default` (PEFT writes None for an
    empty dict)."""
    return value == default or (default == {} and value is None)

