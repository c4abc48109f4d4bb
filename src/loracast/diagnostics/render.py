"""The doctor's report as text: a table drawn by rich when it is installed, else plain columns.

Rows of layers that differ only by their index (``model.layers.0.q_proj``, ``model.layers.1.q_proj``
with the same dtypes) are shown once as ``model.layers.*.q_proj (x2)`` unless `full` is asked.
"""

from __future__ import annotations

import io
import re
import textwrap
from collections import OrderedDict
from typing import Any

from loracast.dtypes import short_dtype_name

COLUMNS = ("module", "adapter", "base", "compute", "A", "B", "other", "grad", "device")
_INDEX = re.compile(r"\.\d+(?=\.|$|:| )")
_MAX_SEEN = 8


def _by_dtype(roles: dict[str, str], all_roles: list[str]) -> str:
    """{"A": "float32", "B": "bfloat16"} -> "A fp32; B bf16"; just "fp32" when it covers every role."""
    grouped: OrderedDict[str, list[str]] = OrderedDict()
    for role, dtype in roles.items():
        grouped.setdefault(short_dtype_name(dtype), []).append(role)
    if len(grouped) == 1 and sorted(roles) == sorted(all_roles):
        return next(iter(grouped))
    return "; ".join(f"{','.join(roles)} {dtype}" for dtype, roles in grouped.items()) or "-"


def _cells(row: dict[str, Any], extra: list[str]) -> list[str]:
    dtypes = row["dtypes"]
    others = [f"{role} {short_dtype_name(dtype)}" for role, dtype in dtypes.items() if role not in ("A", "B")]
    grad = {True: "yes", False: "no", None: "-"}.get(row["requires_grad"], str(row["requires_grad"]))
    compute = short_dtype_name(row["compute"]) if row["compute"] else "-"
    cells = [row["module"], row["adapter"], short_dtype_name(row["base"]), compute, short_dtype_name(dtypes.get("A")),
             short_dtype_name(dtypes.get("B")), ", ".join(others) or "-", grad, row["device"] or "-"]
    return cells + [_by_dtype(row.get(key, {}), list(dtypes)) for key in extra]


def collapse(lines: list[str]) -> list[str]:
    """Lines equal but for layer indices, shown once with the indices as '*' and a count."""
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for line in lines:
        groups.setdefault(_INDEX.sub(".*", line), []).append(line)
    return [members[0] if len(members) == 1 else f"{pattern} (x{len(members)})" for pattern, members in groups.items()]


def extra_columns(report) -> list[str]:
    """"trained" when some row's dtypes differ from those at save; "file" when the file's differ
    from both (a save_dtype was used)."""
    extra = ["trained"] if any("trained" in row for row in report.rows) else []
    if any(row.get("file", {}) != row.get("trained", {}) for row in report.rows if "file" in row):
        extra.append("file")
    return extra


def table(report, full: bool) -> list[list[str]]:
    """The table's rows as cells (grouped by layer index unless `full`)."""
    extra = extra_columns(report)
    rows = [_cells(row, extra) for row in report.rows]
    if full:
        return rows
    groups: OrderedDict[tuple, list[list[str]]] = OrderedDict()
    for cells in rows:
        groups.setdefault((_INDEX.sub(".*", cells[0]), *cells[1:]), []).append(cells)
    out = []
    for key, members in groups.items():
        name = members[0][0] if len(members) == 1 else f"{key[0]} (x{len(members)})"
        out.append([name, *key[1:]])
    return out


def summary_text(entry: dict[str, Any]) -> str:
    """One dtype's line: what is stored or computed in it."""
    parts = []
    if entry["adapter_tensors"]:
        parts.append(f"{entry['adapter_tensors']} adapter tensors ({entry['adapter_values']:,} values)")
    if entry["modules_to_save_tensors"]:
        parts.append(f"{entry['modules_to_save_tensors']} modules_to_save tensors")
    if entry["base_parameters"]:
        parts.append(f"{entry['base_parameters']} base parameters")
    if entry["base_layers_stored"]:
        parts.append(f"{entry['base_layers_stored']} adapted base layers stored")
    if entry["base_layers_computing"]:
        parts.append(f"{entry['base_layers_computing']} quantized layers computing")
    return "; ".join(parts)


def quantization_text(entry: dict[str, Any]) -> str:
    """One kind of quantized layer: backend, how many, storage and compute, what merges requantize with."""
    text = (f"  {entry['backend']}: {entry['layers']} adapted layer{'s' if entry['layers'] != 1 else ''}, storage "
            f"{short_dtype_name(entry['storage'])}, compute {short_dtype_name(entry['compute']) or '-'}")
    if entry.get("requantize_config"):
        source = {"supplied": "recorded when quantized", "inferred": "inferred from the weight"}.get(
            entry.get("config_source"), "")
        text += f"; merges requantize with {entry['requantize_config']}" + (f" ({source})" if source else "")
    return text


def _finding_lines(finding, width: int, full: bool) -> list[str]:
    seen = finding.seen if full else collapse(finding.seen)
    limit = len(seen) if full else _MAX_SEEN
    shown = seen[:limit] + ([f"... and {len(seen) - limit} more"] if len(seen) > limit else [])
    lines = [f"{finding.severity.upper():7} {finding.id}: {finding.title}"]
    lines += ["        seen: " + shown[0]] + ["              " + s for s in shown[1:]] if shown else []
    lines += textwrap.wrap(finding.why, width=width, initial_indent="        why:  ", subsequent_indent="              ")
    lines += ["        fix:"] + ["            " + line for line in finding.fix.splitlines()]
    return lines


def _plain_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(columns, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(columns), line(["-" * w for w in widths])] + [line(r) for r in rows]


def render(report, use_rich: bool | None = None, full: bool = False, width: int = 120, color: bool = False) -> str:
    """The report as text (see the module docstring)."""
    rows = table(report, full)
    counts = {s: len(report.of_severity(s)) for s in ("error", "warning", "info")}
    heading = f"loracast doctor: {report.subject} ({report.kind})"
    tally = ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items())
    dtypes = [f"  {short_dtype_name(e['dtype']):6} {summary_text(e)}" for e in report.summary]
    findings = [line for f in report.findings for line in _finding_lines(f, width - 14, full)]
    notes = [f"note: {n}" for n in report.notes]
    columns = list(COLUMNS) + extra_columns(report)
    # a column with nothing to say (e.g. grad and device for a saved folder) is left out
    keep = [i for i, name in enumerate(columns)
            if name in ("module", "adapter", "base", "A", "B") or any(r[i] != "-" for r in rows)]
    columns, rows = [columns[i] for i in keep], [[r[i] for i in keep] for r in rows]
    rich_table = _rich_table(columns, rows, width, color) if use_rich is not False and rows else None
    table_lines = ([rich_table] if rich_table is not None else _plain_table(columns, rows)) if rows \
        else ["(no adapter tensors)"]
    legend = {"trained": "trained: the dtypes at save time, where they differ (fingerprint)",
              "file": "file: the dtypes in the saved file, where they differ"}
    table_lines += [legend[key] for key in extra_columns(report)]
    quantized = ["", "quantized layers:", *map(quantization_text, report.quantization)] if report.quantization else []
    parts = [heading, "", *table_lines, "", "dtypes:", *dtypes, *quantized, "", f"findings: {tally}", *findings, *notes]
    return "\n".join(parts).rstrip() + "\n"


def _rich_table(columns: list[str], rows: list[list[str]], width: int, color: bool) -> str | None:
    try:
        from rich.box import SIMPLE_HEAD
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return None
    grid = Table(box=SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold" if color else "")
    for name in columns:
        grid.add_column(name, no_wrap=name == "module", overflow="fold")
    for cells in rows:
        grid.add_row(*cells)
    buffer = io.StringIO()
    Console(file=buffer, width=width, force_terminal=color, color_system="auto" if color else None).print(grid)
    return buffer.getvalue().rstrip("\n")
