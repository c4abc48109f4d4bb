"""Plain-text summaries of finished classifier runs, as `loracast train` prints them."""

from __future__ import annotations

from collections.abc import Sequence

from loracast.training.classify.metrics import ClassifyMetrics
from loracast.training.classify.run import RunResult
from loracast.training.common.console import mib, precision_lines


def _final_loss(result: RunResult) -> float:
    """Mean training loss over the last tenth of the steps (single steps are noisy)."""
    losses = [s.loss for s in result.history.steps]
    tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
    return sum(tail) / len(tail)


def format_run(result: RunResult) -> str:
    """Accuracy before/after, the precision summary and the files of one run."""
    m = result.metrics
    seconds = m.precision_summary["seconds_per_step"]
    lines = [f"eval accuracy: {m.eval.accuracy_before:.1%} -> {m.eval.accuracy_after:.1%} "
             f"({m.eval.examples} held-out examples, {len(m.labels)} labels)"]
    if m.diverged_at_step is not None:
        lines.append(f"warning: the loss stopped being finite at step {m.diverged_at_step}; training stopped early")
    lines.extend(precision_lines(m.to_dict()))
    batch = f"{m.train.global_batch}" + (f" ({m.train.processes} processes)" if m.train.processes > 1 else "")
    lines.append(f"  time per step {seconds['median']:.3f} s median ({seconds['min']:.3f}-{seconds['max']:.3f}), "
                 f"{m.precision_summary['examples_per_second']:.1f} examples/s; {m.train.steps} steps of {batch}, "
                 f"train {m.seconds.train:.1f} s, load {m.seconds.load:.1f} s")
    if m.files is not None:
        lines.append(f"saved: {m.files.adapter} (PEFT format), {m.files.metrics}, {m.files.plot}")
    return "\n".join(lines)


def format_comparison(results: Sequence[RunResult], plot: str) -> str:
    """Final metrics of several runs side by side."""
    width = 22
    rows: list[tuple[str, list[str]]] = [
        ("adapters", ["/".join(r.metrics.adapter_dtypes) for r in results]),
        ("base", [r.metrics.base_dtype for r in results]),
        ("eval accuracy before", [f"{r.metrics.eval.accuracy_before:.1%}" for r in results]),
        ("eval accuracy after", [f"{r.metrics.eval.accuracy_after:.1%}" for r in results]),
        ("final train loss", [f"{_final_loss(r):.4f}" for r in results]),
        ("diverged at step", [str(r.metrics.diverged_at_step or "-") for r in results]),
        ("time per step (s)", [f"{r.metrics.precision_summary['seconds_per_step']['median']:.3f}" for r in results]),
        ("adapter+AdamW memory", [mib(_trainable_bytes(r.metrics)) for r in results]),
        ("peak memory (process)", [mib(r.metrics.precision_summary["peak_memory"]["bytes"]) for r in results]),
    ]
    header = "".ljust(width) + "".join(r.policy.ljust(width) for r in results)
    body = [name.ljust(width) + "".join(v.ljust(width) for v in values) for name, values in rows]
    return "\n".join([header, *body, f"plot: {plot}"])


def _trainable_bytes(metrics: ClassifyMetrics) -> int:
    s = metrics.precision_summary
    weights = sum(e["bytes"] for e in s["parameters"].values() if e["trainable"])
    return weights + s["gradient_bytes"] + s["optimizer_state_bytes"]
