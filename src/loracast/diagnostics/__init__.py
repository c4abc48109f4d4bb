"""The precision doctor: what dtype every adapter tensor and base layer is in, and what is wrong.

``loracast.doctor(model_or_path, base=None)`` inspects a live model (loracast's or PEFT's
`PeftModel`, or any module holding LoRA layers), a saved adapter folder (written by loracast
or PEFT), or a saved adapter together with its base model. It returns a `Report` (`report`):
a row per adapted module, a line per dtype, and findings with a stable id, a severity, the
modules seen, why it matters and the fix as code. Read bottom-up: `report` (the result types),
`inputs` (what is inspected), `checks` (the checks, one module per area, each declaring the kinds of
finding it reports), `catalogue` (the table of finding ids, generated from those declarations),
`table` (rows as data), `render` (text).
"""

from __future__ import annotations

import os

from torch import nn

from loracast.diagnostics.checks import run_checks
from loracast.diagnostics.inputs import collect
from loracast.diagnostics.report import SEVERITIES, Finding, Report, UnreadableInput
from loracast.diagnostics.table import quantization_lines, summary_lines, table_rows

__all__ = ["Finding", "Report", "UnreadableInput", "doctor"]


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
    inventory = collect(model_or_path, base, fsdp)
    findings = run_checks(inventory)
    findings.sort(key=lambda f: SEVERITIES.index(f.severity))
    return Report(subject=inventory.subject, kind=inventory.kind, rows=table_rows(inventory),
                  summary=summary_lines(inventory), findings=findings, notes=inventory.notes,
                  quantization=quantization_lines(inventory))
