"""The precision doctor: what dtype every adapter tensor and base layer is in, and what is wrong.

``loracast.doctor(model_or_path, base=None)`` inspects a live model (loracast's or PEFT's
`PeftModel`, or any module holding LoRA layers), a saved adapter folder (written by loracast
or PEFT), or a saved adapter together with its base model (a module or a local transformers
model folder, into a copy of which the adapter is loaded as `PeftModel.from_pretrained` would).
It returns a `Report`: a row per adapted module (base storage and compute dtype, adapter
dtypes, requires_grad, device), a line per dtype, and findings, each with a stable id, a
severity, the module names it saw, why it matters and the fix as code. The checks live in
`doctor_checks`, the input readers in `doctor_inputs`, the table as data in `doctor_table`, its
text rendering in `doctor_render`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

SEVERITIES = ("error", "warning", "info")


class UnreadableInput(ValueError):
    """The doctor could not read what it was given (the message says what and why)."""


@dataclass
class Finding:
    """One thing the doctor found.

    Attributes:
        id: stable identifier, e.g. "fp16-trainable" (listed in `doctor_checks.CHECKS`).
        severity: "error", "warning" or "info".
        title: one line saying what was found.
        seen: where: module or tensor names, or the differences found.
        why: why it matters.
        fix: the fix, as code.
    """

    id: str
    severity: str
    title: str
    seen: list[str]
    why: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


@dataclass
class Report:
    """What the doctor found about one model or adapter.

    Attributes:
        subject: what was inspected (a path or a model class name).
        kind: "model", "adapter folder" or "adapter folder + base".
        rows: one dict per adapted module and adapter (see `doctor_table.table_rows`).
        summary: one dict per dtype: counts of adapter tensors, their values, and base layers.
        findings: errors first, then warnings, then infos.
        notes: other things worth saying (e.g. which adapters were found).
    """

    subject: str
    kind: str
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    findings: list[Finding]
    notes: list[str] = field(default_factory=list)

    def of_severity(self, severity: str) -> list[Finding]:
        """The findings of one severity."""
        return [f for f in self.findings if f.severity == severity]

    @property
    def errors(self) -> list[Finding]:
        """The findings of severity "error"."""
        return self.of_severity("error")

    @property
    def ids(self) -> list[str]:
        """The ids of all findings, in report order."""
        return [f.id for f in self.findings]

    @property
    def exit_status(self) -> int:
        """1 when any error was found, else 0 (the command line's exit status)."""
        return 1 if self.errors else 0

    def to_dict(self) -> dict[str, Any]:
        """The whole report as JSON-ready values."""
        return {"subject": self.subject, "kind": self.kind, "exit_status": self.exit_status,
                "counts": {s: len(self.of_severity(s)) for s in SEVERITIES}, "rows": self.rows,
                "summary": self.summary, "findings": [f.to_dict() for f in self.findings], "notes": self.notes}

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def render(self, rich: bool | None = None, full: bool = False, width: int = 120, color: bool = False) -> str:
        """The report as text: a table (drawn by rich when installed, unless `rich` is False),
        the dtype summary and the findings. `full` lists every module instead of grouping
        layers that differ only by their index; `color` adds terminal colours (rich only)."""
        from .doctor_render import render

        return render(self, use_rich=rich, full=full, width=width, color=color)

    def __str__(self) -> str:
        return self.render(rich=False)


def doctor(model_or_path: nn.Module | str | os.PathLike, base: nn.Module | str | os.PathLike | None = None,
           *, fsdp: bool | None = None) -> Report:
    """Inspect the precision of a model or saved adapter and report what is wrong.

    Args:
        model_or_path: a live model (loracast or PEFT `PeftModel`, or a module with LoRA layers),
            an adapter folder written by `save_pretrained` (loracast or PEFT), or a local
            transformers model folder.
        base: with a folder: the base model to load the adapter into (a module, which is
            copied first and left untouched, or a local transformers model folder).
        fsdp: True to run the FSDP checks even when FSDP is not detected (not in use, no
            "fsdp" policy, no ACCELERATE_USE_FSDP); False to skip them.

    Raises:
        UnreadableInput: the path or base cannot be read (the message says why).
    """
    from .doctor_checks import run_checks
    from .doctor_inputs import collect
    from .doctor_table import summary_lines, table_rows

    inventory = collect(model_or_path, base, fsdp)
    findings = run_checks(inventory)
    findings.sort(key=lambda f: SEVERITIES.index(f.severity))
    return Report(subject=inventory.subject, kind=inventory.kind, rows=table_rows(inventory),
                  summary=summary_lines(inventory), findings=findings, notes=inventory.notes)
