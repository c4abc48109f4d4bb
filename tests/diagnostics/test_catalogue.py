"""The catalogue of finding ids: generated from the registry of checks, shown on the documentation's doctor page, and
the only way to emit a finding."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loracast.diagnostics import catalogue
from loracast.diagnostics.checks import CHECKS, KINDS, Check, run_checks
from loracast.diagnostics.checks.registry import finding_kind
from loracast.diagnostics.inputs import Inventory
from loracast.diagnostics.report import SEVERITIES, Finding
from loracast.errors import LoracastError

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "doctor.md"  # the doctor page of the documentation site
FIX = "run: python -m loracast.diagnostics.catalogue"


def test_the_readme_table_is_the_generated_catalogue():
    block = catalogue.current_block(PAGE.read_text(encoding="utf-8"), "docs/doctor.md")
    assert block == catalogue.generated_block(), f"docs/doctor.md's doctor findings table differs from the checks; {FIX}"


def test_the_table_has_one_row_per_registered_id_in_run_order():
    rows = [line for line in catalogue.markdown_table().splitlines()[2:]]
    assert [re.match(r"\| `([^`]+)` \|", row)[1] for row in rows] == list(KINDS)
    assert [kind.id for kind in catalogue.catalogue()] == list(KINDS)
    assert "| `quant-no-compute-dtype` | warning / info (on a PEFT model) |" in catalogue.markdown_table()


def test_every_kind_is_complete_and_every_check_declares_kinds():
    for kind in KINDS.values():
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)+", kind.id), kind.id
        assert kind.severity in SEVERITIES and kind.other_severity in (None, *SEVERITIES)
        assert kind.title.strip() and kind.explanation.strip(), kind.id
    assert all(check.kinds for check in CHECKS)
    assert sum(len(check.kinds) for check in CHECKS) == len(KINDS)  # each kind reported by exactly one check


def test_stale_texts_are_gone():
    unsupported = KINDS["unsupported-peft-options"].explanation
    text = catalogue.markdown_table()
    for implemented in ("DoRA", "PiSSA", "OLoRA", "LoftQ"):
        assert implemented not in unsupported and implemented not in text
    assert "CHECKS" not in (Finding.__doc__ or "")


def test_troubleshooting_names_only_registered_ids():
    text = PAGE.read_text(encoding="utf-8")
    section = text[text.index("## Troubleshooting"):]
    section = section.split("\n## ", 1)[0]  # to the next section, or the page's end
    named = set(re.findall(r"`([a-z0-9]+(?:-[a-z0-9]+)+)`", section.split("|---|---|", 1)[1]))
    assert named and named <= set(KINDS), sorted(named - set(KINDS))


def test_no_diagnostics_module_builds_findings_by_hand():
    """Findings are made by their kind (`KIND.found`), so an id cannot escape the registry."""
    source = ROOT / "src" / "loracast" / "diagnostics"
    by_hand = [str(p.relative_to(source)) for p in source.rglob("*.py")
               if "Finding(" in p.read_text(encoding="utf-8") and p.name != "registry.py"]
    assert by_hand == []


def test_a_check_reporting_an_undeclared_id_is_refused():
    declared = KINDS["no-adapters"]
    other = KINDS["fp16-trainable"]
    inventory = Inventory("m", "model", live=True)

    def report_other(inv: Inventory) -> list[Finding]:
        return [other.found(title="t", seen=[], why="w", fix="f")]

    with pytest.raises(LoracastError, match=r"reported 'fp16-trainable', which its @check\(\.\.\.\) does not name"):
        run_checks(inventory, [Check(report_other, (declared,))])
    assert run_checks(inventory, [Check(report_other, (other,))])[0].id == "fp16-trainable"


def test_a_kind_refuses_a_severity_it_does_not_declare_and_ids_declared_twice():
    with pytest.raises(LoracastError, match="declared warning and cannot be made with severity 'error'"):
        KINDS["mixed-adapter-dtypes"].found(title="t", seen=[], why="w", fix="f", severity="error")
    assert KINDS["saved-dtype-differs"].found(title="t", seen=[], why="w", fix="f", severity="info").severity == "info"
    with pytest.raises(LoracastError, match="'fp16-trainable' is declared twice"):
        finding_kind("fp16-trainable", "error", title="t", explanation="e")
    with pytest.raises(TypeError):
        Finding("x", "error", "t", [], "w", "f")  # keyword fields only


def test_the_command_rewrites_and_checks_a_file(tmp_path, capsys):
    path = tmp_path / "doc.md"
    path.write_text(f"intro\n{catalogue.BEGIN}\nold table\n{catalogue.END}\nafter\n", encoding="utf-8")
    assert catalogue.main([str(path), "--check"]) == 1
    assert catalogue.main([str(path)]) == 0
    assert path.read_text(encoding="utf-8") == f"intro\n{catalogue.generated_block()}\nafter\n"
    assert catalogue.main([str(path), "--check"]) == 0
    path.write_text("no markers\n", encoding="utf-8")
    assert catalogue.main([str(path)]) == 2
    assert "has no doctor findings block" in capsys.readouterr().err
