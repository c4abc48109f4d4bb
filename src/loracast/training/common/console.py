"""Lines both jobs print in their summaries: sizes in MiB and the precision summary."""

from __future__ import annotations

from typing import Any

MIB = 1024 * 1024
KIND_ORDER = ("base", "adapters", "modules_to_save", "trainable_other")


def mib(n: float) -> str:
    """`n` bytes in MiB, as the summaries print them."""
    return f"{n / MIB:,.1f} MiB"


def dtypes_text(entry: dict[str, Any]) -> str:
    """The dtypes of a parameter-table entry, joined by '/'."""
    return "/".join(entry["dtypes"]) or "-"


def precision_lines(metrics: dict[str, Any]) -> list[str]:
    """The precision summary of a run's metrics: each kind of parameter with its dtypes and size,
    what training them costs, and the peak memory."""
    m, s = metrics, metrics["precision_summary"]
    lines = [f"precision summary (policy {m['policy']}, base {m['base_dtype']}):"]
    for kind in KIND_ORDER:
        entry = s["parameters"].get(kind)
        if entry:
            state = "trainable" if entry["trainable"] else "frozen"
            lines.append(f"  {kind:<16}{dtypes_text(entry):<24}{entry['params']:>13,} params {mib(entry['bytes']):>12}"
                         f"  {state}")
    lines.append(f"  trainable {s['trainable_params']:,} of {s['total_params']:,} ({s['trainable_share']:.2%}); "
                 f"gradients {mib(s['gradient_bytes'])}, AdamW state {mib(s['optimizer_state_bytes'])}")
    lines.append(f"  peak memory {mib(s['peak_memory']['bytes'])} ({s['peak_memory']['what']})")
    return lines
