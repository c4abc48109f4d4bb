"""Checks on adapter configs: PEFT options loracast does not implement, and fields it does not know."""

from __future__ import annotations

from dataclasses import fields

from loracast.config import LoraConfig, unsupported_options
from loracast.diagnostics.checks.registry import check, finding_kind
from loracast.diagnostics.checks.words import count
from loracast.diagnostics.inputs import Inventory
from loracast.diagnostics.report import Finding

__all__ = ["UNKNOWN_PEFT_FIELDS", "UNSUPPORTED_PEFT_OPTIONS", "check_config"]

UNSUPPORTED_PEFT_OPTIONS = finding_kind(
    "unsupported-peft-options", "error",
    title="PEFT options that change the math and loracast does not implement (each listed with its value)",
    explanation="loracast refuses to load such an adapter rather than compute something else.",
    other_severity="warning", other_when="on a live PEFT model, which runs them")
UNKNOWN_PEFT_FIELDS = finding_kind(
    "unknown-peft-fields", "warning", title="config fields from a newer PEFT",
    explanation="loracast keeps them when it re-saves the config but does not act on them.")

_KNOWN_FIELDS = {f.name for f in fields(LoraConfig)} - {"extra_fields"} | {"runtime_config"}


@check(UNSUPPORTED_PEFT_OPTIONS, UNKNOWN_PEFT_FIELDS)
def check_config(inv: Inventory) -> list[Finding]:
    unsupported, unknown = [], []
    for adapter, config in inv.configs.items():
        unsupported += [f"{adapter}: {k}={v!r}" for k, v in unsupported_options(config).items()]
        unknown += [f"{adapter}: {k}={config[k]!r}" for k in sorted(set(config) - _KNOWN_FIELDS)]
    out = []
    if unsupported:
        out.append(UNSUPPORTED_PEFT_OPTIONS.found(
            # in a live PEFT model they work (in PEFT); loracast could not load the saved adapter
            severity="warning" if inv.peft_model else "error",
            title=f"{count(len(unsupported), 'PEFT option')} changing the math, not implemented by loracast",
            seen=unsupported,
            why="Each option listed changes how the adapter computes its output or how it is initialised, and this "
                "version of loracast does not implement it: loracast refuses to load such an adapter rather than "
                "compute something else than it did in training.",
            fix="from peft import PeftModel  # PEFT implements these options\n"
                "model = PeftModel.from_pretrained(base_model, path)"))
    if unknown:
        out.append(UNKNOWN_PEFT_FIELDS.found(
            title=f"{count(len(unknown), 'config field')} unknown to loracast", seen=unknown,
            why="They come from a newer PEFT. loracast keeps them when it re-saves the config but does not act on "
                "them; if one changes the math, the loaded adapter computes something else than it did in training.",
            fix="pip install --upgrade loracast  # or load with the PEFT version that wrote the adapter"))
    return out
