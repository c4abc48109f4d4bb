"""The catalogue of the doctor's findings, generated from the registry of checks.

Every kind of finding is declared once, beside the check that reports it
(`loracast.diagnostics.checks.registry.finding_kind`); this module renders them as the Markdown
table the documentation's doctor page shows between `BEGIN` and `END`. ``python -m loracast.diagnostics.catalogue``
rewrites that block in docs/doctor.md; ``--check`` only says whether it is current (exit status 1 when not).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loracast.diagnostics.checks import KINDS, FindingKind

BEGIN = "<!-- doctor-findings: generated from the checks by `python -m loracast.diagnostics.catalogue`; do not edit -->"
END = "<!-- /doctor-findings -->"


def catalogue() -> list[FindingKind]:
    """Every kind of finding the doctor can report, in the order its checks run."""
    return list(KINDS.values())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(kinds: list[FindingKind] | None = None) -> str:
    """The catalogue as a Markdown table: id, severity, found when, why it matters (no trailing newline)."""
    rows = ["| id | severity | found when | why it matters |", "|---|---|---|---|"]
    for kind in catalogue() if kinds is None else kinds:
        rows.append(f"| `{kind.id}` | {_cell(kind.severity_text)} | {_cell(kind.title)} | {_cell(kind.explanation)} |")
    return "\n".join(rows)


def generated_block() -> str:
    """The doctor page's block: the markers around the table."""
    return f"{BEGIN}\n{markdown_table()}\n{END}"


def current_block(text: str, where: str = "the text") -> str:
    """The doctor findings block as it stands in `text`, markers included.

    Raises:
        ValueError: `text` lacks the markers (the message gives them).
    """
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{where} has no doctor findings block: add the lines\n{BEGIN}\n{END}\nwhere the table goes")
    return text[start:end + len(END)]


def replace_block(text: str, where: str = "the text") -> str:
    """`text` with its doctor findings block replaced by the generated one.

    Raises:
        ValueError: `text` lacks the markers (the message gives them).
    """
    return text.replace(current_block(text, where), generated_block(), 1)


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or, with --check, compare) the findings table in a Markdown file; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m loracast.diagnostics.catalogue",
                                     description="Write the doctor's catalogue of findings into a Markdown file.")
    parser.add_argument("path", nargs="?", default="docs/doctor.md", help="the file holding the block (default docs/doctor.md)")
    parser.add_argument("--check", action="store_true", help="only say whether the block is current")
    args = parser.parse_args(argv)
    path = Path(args.path)
    try:
        text = path.read_text(encoding="utf-8")
        updated = replace_block(text, str(path))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if updated == text:
        print(f"{path}: the doctor findings table is current ({len(KINDS)} ids)")
        return 0
    if args.check:
        print(f"{path}: the doctor findings table differs from the checks; run python -m loracast.diagnostics.catalogue",
              file=sys.stderr)
        return 1
    path.write_text(updated, encoding="utf-8")
    print(f"{path}: doctor findings table written ({len(KINDS)} ids)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
