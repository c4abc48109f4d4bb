"""PNG plots of training runs: loss per step and eval accuracy, one or several runs per figure.

matplotlib is imported lazily with the Agg backend (no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from loracast.training.common.history import History


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs: Sequence[tuple[str, History]], path: str | os.PathLike, title: str,
              score_name: str = "held-out accuracy") -> Path:
    """Write a two-panel PNG (training loss per step; the eval score, named `score_name`) with one
    curve per run.

    Raises:
        ImportError: matplotlib is not installed (install loracast[demo]).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=110)
    loss_axes, acc_axes = figure.subplots(1, 2)
    for index, (name, history) in enumerate(runs):
        color = f"C{index}"
        steps = [s.step for s in history.steps]
        losses = [s.loss for s in history.steps]
        if steps:
            window = max(1, round(len(steps) ** 0.5 / 2))  # 3 steps of 30, 10 of 400: visible but not laggy
            loss_axes.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
            loss_axes.plot(steps, _smooth(losses, window), color=color, linewidth=1.8, label=f"{name}")
        evals = history.evals
        acc_axes.plot([e.step for e in evals], [100 * e.accuracy for e in evals], marker="o", color=color,
                      label=f"{name}: {100 * evals[0].accuracy:.1f}% -> {100 * evals[-1].accuracy:.1f}%")
    loss_axes.set(title="training loss (thin: per step, thick: moving average)", xlabel="step", ylabel="loss")
    acc_axes.set(title=score_name, xlabel="step", ylabel=f"{score_name} (%)", ylim=(0, 100))
    for axes in (loss_axes, acc_axes):
        axes.grid(alpha=0.3)
        axes.legend(loc="best", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial")
    try:  # written aside and renamed, so a reader never sees half a PNG
        figure.savefig(partial, format="png")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
