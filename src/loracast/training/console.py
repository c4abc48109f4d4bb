"""Plain-text summaries of finished runs, as `loracast train` prints them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loracast.training.run import RunResult

MIB = 1024 * 1024
KIND_ORDER = ("base", "adapters", "modules_to_save", "trainable_other")


def mib(n: float) -> str:
    """`n` bytes in MiB, as the summaries print them."""
    return f"{n / MIB:,.1f} MiB"


def dtypes_text(entry: dict[str, Any]) -> str:
    """The dtypes of a parameter-table entry, joined by '/'."""
    return "/".join(entry["dtypes"]) or "-"


def _final_loss(result: RunResult) -> float:
    """Mean training loss over the last tenth of the steps (single steps are noisy)."""
    losses = [s.loss for s in result.history.steps]
    tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
    return sum(tail) / len(tail)


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


def format_run(result: RunResult) -> str:
    """Accuracy before/after, the precision summary and the files of one run."""
    m = result.metrics
    s = m["precision_summary"]
    seconds = s["seconds_per_step"]
    lines = [f"eval accuracy: {m['eval']['accuracy_before']:.1%} -> {m['eval']['accuracy_after']:.1%} "
             f"({m['eval']['examples']} held-out examples, {len(m['labels'])} labels)"]
    if m["diverged_at_step"] is not None:
        lines.append(f"warning: the loss stopped being finite at step {m['diverged_at_step']}; training stopped early")
    lines.extend(precision_lines(m))
    lines.append(f"  time per step {seconds['median']:.3f} s median ({seconds['min']:.3f}-{seconds['max']:.3f}), "
                 f"{s['examples_per_second']:.1f} examples/s; {m['train']['steps']} steps, "
                 f"train {m['seconds']['train']:.1f} s, load {m['seconds']['load']:.1f} s")
    files = m.get("files")
    if files:
        lines.append(f"saved: {files['adapter']} (PEFT format), {files['metrics']}, {files['plot']}")
    return "\n".join(lines)


def format_comparison(results: Sequence[RunResult], plot: str) -> str:
    """Final metrics of several runs side by side."""
    width = 22
    rows: list[tuple[str, list[str]]] = [
        ("adapters", ["/".join(r.metrics["adapter_dtypes"]) for r in results]),
        ("base", [r.metrics["base_dtype"] for r in results]),
        ("eval accuracy before", [f"{r.metrics['eval']['accuracy_before']:.1%}" for r in results]),
        ("eval accuracy after", [f"{r.metrics['eval']['accuracy_after']:.1%}" for r in results]),
        ("final train loss", [f"{_final_loss(r):.4f}" for r in results]),
        ("diverged at step", [str(r.metrics["diverged_at_step"] or "-") for r in results]),
        ("time per step (s)", [f"{r.metrics['precision_summary']['seconds_per_step']['median']:.3f}" for r in results]),
        ("adapter+AdamW memory", [mib(_trainable_bytes(r.metrics)) for r in results]),
        ("peak memory (process)", [mib(r.metrics["precision_summary"]["peak_memory"]["bytes"]) for r in results]),
    ]
    header = "".ljust(width) + "".join(r.policy.ljust(width) for r in results)
    body = [name.ljust(width) + "".join(v.ljust(width) for v in values) for name, values in rows]
    return "\n".join([header, *body, f"plot: {plot}"])


def _trainable_bytes(metrics: dict[str, Any]) -> int:
    s = metrics["precision_summary"]
    weights = sum(e["bytes"] for e in s["parameters"].values() if e["trainable"])
    return weights + s["gradient_bytes"] + s["optimizer_state_bytes"]
