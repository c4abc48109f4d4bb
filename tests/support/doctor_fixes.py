"""Applying the doctor's printed fixes in tests: the fix text is executed as written.

A fix may offer alternatives, separated by a comment line starting with "# or"; `apply_fix`
runs one of them in a namespace holding the names the fix code uses (model, base_model, path,
torch, loracast, ...), and returns the namespace so the test can read what the fix made.
"""

from __future__ import annotations

import re
from typing import Any

import torch

import loracast
from loracast.diagnostics import Finding, Report


def the(report: Report, finding_id: str) -> Finding:
    """The one finding with `finding_id` in `report` (fails listing the ids found otherwise)."""
    found = [f for f in report.findings if f.id == finding_id]
    assert len(found) == 1, report.ids
    return found[0]


def alternatives(fix: str) -> list[str]:
    """The fix's code split at its '# or' comment lines."""
    return [part for part in re.split(r"^# or\b.*$", fix, flags=re.M) if part.strip()]


def apply_fix(finding: Finding, choice: int = 0, **names: Any) -> dict[str, Any]:
    """Execute alternative `choice` of `finding.fix` with `names` in scope; the namespace after it."""
    from transformers import AutoModelForCausalLM

    namespace: dict[str, Any] = {"torch": torch, "loracast": loracast, "AutoModelForCausalLM": AutoModelForCausalLM}
    namespace.update(names)
    exec(alternatives(finding.fix)[choice], namespace)
    return namespace
