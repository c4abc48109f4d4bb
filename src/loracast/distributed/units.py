"""Sharding units: which modules get their own FSDP unit, and which parameters each unit holds.

FSDP (both versions) groups parameters by unit: a wrapped module holds its own parameters and
those of its sub-modules that no nested unit claims; the root unit holds the rest. FSDP1 flattens
each unit into one tensor, so a unit's parameters must share one dtype (and, with
``use_orig_params=False``, one ``requires_grad``); FSDP2 keeps parameters apart but needs the
*trainable* ones of a unit to share one dtype. These are pure functions over the module tree, so
a problem can be found before any process group exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from loracast.errors import LoracastError


def transformer_block_classes(model: nn.Module, block_classes: Iterable[type | str] | None = None
                              ) -> tuple[type, ...]:
    """The classes of `model`'s repeated blocks, each sharded as one unit.

    `block_classes` (classes or class names) if given; else the names transformers models list
    in ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``). Only classes present in `model` are returned.

    Raises:
        ValueError: a requested class is not in the model, or no block class can be found.
    """
    present: dict[str, type] = {}
    for module in model.modules():
        present.setdefault(type(module).__name__, type(module))
    if block_classes is None:
        names: list[str] = []
        for module in model.modules():
            names.extend(getattr(module, "_no_split_modules", None) or [])
        found = tuple(dict.fromkeys(present[n] for n in names if n in present))
        if not found:
            raise ValueError(
                f"cannot tell which modules of {type(model).__name__} are its transformer blocks: no module "
                "lists them in _no_split_modules; pass block_classes=[YourBlock] (classes or class names)")
        return found
    wanted = list(block_classes)
    missing = [w for w in wanted if (w if isinstance(w, str) else w.__name__) not in present
               or (not isinstance(w, str) and present[w.__name__] is not w)]
    if missing:
        shown = [w if isinstance(w, str) else w.__name__ for w in missing]
        raise ValueError(f"block_classes {shown} are not modules of {type(model).__name__}; its module classes "
                         f"are {sorted(present)}")
    return tuple(dict.fromkeys(present[w] if isinstance(w, str) else w for w in wanted))


def unit_parameters(model: nn.Module, units: Iterable[nn.Module]
                    ) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Unit path -> (parameter name, parameter) it holds; ``""`` is the root unit.

    A parameter reachable twice (tied weights) is counted once, where it is first reached.
    """
    unit_ids = {id(m) for m in units if m is not model}
    out: dict[str, list[tuple[str, nn.Parameter]]] = {"": []}
    seen: set[int] = set()

    def visit(module: nn.Module, path: str, owner: str) -> None:
        if path and id(module) in unit_ids:
            owner = path
            out.setdefault(owner, [])
        for name, param in module.named_parameters(recurse=False):
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                out[owner].append((f"{path}.{name}" if path else name, param))
        for child_name, child in module.named_children():
            visit(child, f"{path}.{child_name}" if path else child_name, owner)

    visit(model, "", "")
    return out


class FSDPSetupError(LoracastError):
    """FSDP cannot shard the model as configured; the message lists each unit at fault and the fix."""


@dataclass(frozen=True)
class UnitProblem:
    """One reason a sharding unit cannot be built as configured.

    Attributes:
        unit: the unit's module path ("" for the root unit).
        kind: "mixed-dtype", "mixed-requires-grad", "integer-storage" or "mixed-trainable-dtype".
        groups: a label per kind of parameter in the unit (e.g. "torch.float32, trainable")
            -> up to a few of its parameter names.
        fix: what to change, as code.
    """

    unit: str
    kind: str
    groups: dict[str, list[str]] = field(default_factory=dict)
    fix: str = ""

    def __str__(self) -> str:
        where = f"unit {self.unit!r}" if self.unit else "the root unit"
        kinds = "; ".join(f"{label}: {', '.join(names)}" for label, names in self.groups.items())
        return f"{where} holds {_KIND_TEXT[self.kind]} ({kinds}); fix: {self.fix}"


_KIND_TEXT = {
    "mixed-dtype": "parameters of several dtypes",
    "mixed-requires-grad": "trainable and frozen parameters together",
    "integer-storage": "integer-stored (quantized) weights, which cannot be flattened or sharded",
    "mixed-trainable-dtype": "trainable parameters of several dtypes",
}


def label(param: torch.Tensor) -> str:
    """A parameter's dtype and trainability, as problem reports show them."""
    return f"{param.dtype}, {'trainable' if param.requires_grad else 'frozen'}"


def group_names(params: Sequence[tuple[str, torch.Tensor]], key) -> dict[str, list[str]]:
    """`key(param)` -> the first few names of the parameters with that key (with a count when cut)."""
    groups: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for name, param in params:
        k = key(param)
        counts[k] = counts.get(k, 0) + 1
        if counts[k] <= 3:
            groups.setdefault(k, []).append(name)
    for k, count in counts.items():
        if count > 3:
            groups[k].append(f"... {count} in all")
    return groups


def format_problems(problems: list[UnitProblem], what: str) -> str:
    """One message for a list of problems, shortened past a few units."""
    lines = [str(p) for p in problems[:4]]
    if len(problems) > 4:
        lines.append(f"... {len(problems)} units in all")
    return f"{what}:\n  " + "\n  ".join(lines)
