"""What the doctor returns: findings (stable id, severity, where, why, fix) and the report that holds them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from loracast.errors import LoracastError

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")


def count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 base weight', '3 base weights': for finding titles."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"


class UnreadableInput(LoracastError):
    """The doctor could not read what it was given (the message says what and why)."""


@dataclass(kw_only=True)
class Finding:
    """One thing the doctor found, built with keyword fields.

    Attributes:
        id: stable identifier, e.g. "fp16-trainable" (every id is in the catalogue,
            `loracast.diagnostics.catalogue`).
        severity: "error", "warning" or "info".
        title: one line saying what was found.
        seen: where: module or tensor names, or the differences found.
        why: why it matters.
        fix: the fix, as code.
    """

    id: str
    severity: Severity
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
        rows: one dict per adapted module and adapter (see `loracast.diagnostics.table.table_rows`).
        summary: one dict per dtype: counts of adapter tensors, their values, and base layers.
        findings: errors first, then warnings, then infos.
        notes: other things worth saying (e.g. which adapters were found).
        quantization: one dict per kind of quantized adapted base layer: backend, storage and
            compute dtypes, the config merges requantize with (see `table.quantization_lines`).
    """

    subject: str
    kind: str
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    findings: list[Finding]
    notes: list[str] = field(default_factory=list)
    quantization: list[dict[str, Any]] = field(default_factory=list)

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
                "summary": self.summary, "findings": [f.to_dict() for f in self.findings], "notes": self.notes,
                "quantization": self.quantization}

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def render(self, rich: bool | None = None, full: bool = False, width: int = 120, color: bool = False) -> str:
        """The report as text: a table (drawn by rich when installed, unless `rich` is False),
        the dtype summary and the findings. `full` lists every module instead of grouping
        layers that differ only by their index; `color` adds terminal colours (rich only)."""
        from loracast.diagnostics.render import render

        return render(self, use_rich=rich, full=full, width=width, color=color)

    def __str__(self) -> str:
        return self.render(rich=False)
