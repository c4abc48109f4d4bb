"""The doctor's registry: every kind of finding and every check, declared beside the check's code.

A module of checks declares each kind of finding it can report once, with `finding_kind` (id,
usual severity, a one-line title and a short explanation), and registers each check with
`@check(KIND, ...)`, naming the kinds it reports. Findings are made by the kind
(``KIND.found(title=..., seen=..., why=..., fix=...)``), so an id cannot be emitted without being
declared, and `run_checks` refuses a finding whose kind its check did not name. The catalogue users
read (`loracast.diagnostics.catalogue`) is generated from `KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loracast.diagnostics.report import SEVERITIES, Finding, Severity
from loracast.errors import LoracastError

if TYPE_CHECKING:
    from loracast.diagnostics.inputs import Inventory


@dataclass(frozen=True)
class FindingKind:
    """One kind of finding, as the catalogue lists it.

    Attributes:
        id: the stable identifier findings of this kind carry, e.g. "fp16-trainable".
        severity: the severity it usually has.
        title: when it is reported, in one line (the catalogue's "found when").
        explanation: why it matters, in a sentence or two.
        other_severity: the other severity it can take, or None.
        other_when: when it takes `other_severity` (e.g. "on a PEFT model").
    """

    id: str
    severity: Severity
    title: str
    explanation: str
    other_severity: Severity | None = None
    other_when: str = ""

    def found(self, *, title: str, seen: list[str], why: str, fix: str, severity: Severity | None = None) -> Finding:
        """A finding of this kind.

        Args:
            title: one line saying what was found here (counts, dtypes, the memory it costs).
            seen: where: module or tensor names, or the differences found.
            why: why it matters.
            fix: the fix, as code.
            severity: the severity, when not the usual one (must be `severity` or `other_severity`).

        Raises:
            LoracastError: `severity` is not one this kind declares.
        """
        severity = severity or self.severity
        if severity not in (self.severity, self.other_severity):
            raise LoracastError(f"finding {self.id!r} is declared {self.severity_text} and cannot be made with "
                                f"severity {severity!r}: declare it as other_severity in its finding_kind(...)")
        return Finding(id=self.id, severity=severity, title=title, seen=seen, why=why, fix=fix)

    @property
    def severity_text(self) -> str:
        """'warning', or 'warning / info (on a PEFT model)' when it can take another severity."""
        if self.other_severity is None:
            return self.severity
        when = f" ({self.other_when})" if self.other_when else ""
        return f"{self.severity} / {self.other_severity}{when}"


@dataclass(frozen=True)
class Check:
    """One registered check: a function reading an `Inventory`, and the kinds of finding it reports."""

    function: Callable[[Inventory], list[Finding]]
    kinds: tuple[FindingKind, ...]

    @property
    def name(self) -> str:
        """'<area module>.<function>', e.g. 'training.check_fp16_trainable'."""
        return f"{self.function.__module__.rpartition('.')[2]}.{self.function.__name__}"


KINDS: dict[str, FindingKind] = {}  # id -> kind, in declaration order (the catalogue's order)
CHECKS: list[Check] = []  # in registration order (the order findings of one severity are reported in)


def finding_kind(id: str, severity: Severity, *, title: str, explanation: str,
                 other_severity: Severity | None = None, other_when: str = "") -> FindingKind:
    """Declare a kind of finding and add it to the catalogue.

    Raises:
        LoracastError: the id is declared twice, or a severity is not one of SEVERITIES.
    """
    if id in KINDS:
        raise LoracastError(f"finding id {id!r} is declared twice; each id is declared once, in the module of "
                            "the check that reports it")
    for value in (severity, other_severity):
        if value is not None and value not in SEVERITIES:
            raise LoracastError(f"finding {id!r}: severity {value!r} is not one of {', '.join(SEVERITIES)}")
    kind = FindingKind(id, severity, title, explanation, other_severity, other_when)
    KINDS[id] = kind
    return kind


def check(*kinds: FindingKind) -> Callable[[Callable[[Inventory], list[Finding]]], Callable[[Inventory], list[Finding]]]:
    """Register the decorated function as a check reporting findings of `kinds`; returns it unchanged.

    Raises:
        LoracastError: no kind is named, or a kind was not declared with `finding_kind`.
    """
    if not kinds:
        raise LoracastError("@check() needs the kinds of finding the check reports: @check(KIND, ...)")
    for kind in kinds:
        if KINDS.get(kind.id) is not kind:
            raise LoracastError(f"@check names finding {kind.id!r}, which was not declared with finding_kind(...)")

    def register(function: Callable[[Inventory], list[Finding]]) -> Callable[[Inventory], list[Finding]]:
        CHECKS.append(Check(function, kinds))
        return function

    return register


def run_checks(inventory: Inventory, checks: Sequence[Check] | None = None) -> list[Finding]:
    """Every finding of every registered check (or of `checks`), in registration order.

    Raises:
        LoracastError: a check reported a finding whose kind it does not name in its @check(...).
    """
    found: list[Finding] = []
    for registered in CHECKS if checks is None else checks:
        allowed = {kind.id for kind in registered.kinds}
        for finding in registered.function(inventory):
            if finding.id not in allowed:
                raise LoracastError(f"check {registered.name} reported {finding.id!r}, which its @check(...) does "
                                    f"not name (it names {', '.join(sorted(allowed))}): add the kind there")
            found.append(finding)
    return found
