"""What a run records step by step: the source of metrics.json's history and of the plots."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepRecord:
    """One optimiser step."""

    step: int
    epoch: float
    loss: float
    seconds: float
    examples: int
    tokens: int = 0  # trained (non-padding) tokens, for language models


@dataclass
class EvalRecord:
    """One evaluation on the held-out set (`accuracy`: the job's score, exact match for SFT)."""

    step: int
    accuracy: float
    loss: float


@dataclass
class History:
    """What a run recorded."""

    steps: list[StepRecord] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)
    diverged_at_step: int | None = None  # first step whose loss was not finite

    @property
    def accuracy_before(self) -> float:
        """Eval score before the first step."""
        return self.evals[0].accuracy

    @property
    def accuracy_after(self) -> float:
        """Eval score after the last step."""
        return self.evals[-1].accuracy

    def step_seconds(self) -> dict[str, float]:
        """Median, min and max seconds per step (the first step, which warms caches, excluded when possible)."""
        times = [s.seconds for s in self.steps[1:]] or [s.seconds for s in self.steps]
        if not times:
            return {"median": math.nan, "min": math.nan, "max": math.nan}
        return {"median": statistics.median(times), "min": min(times), "max": max(times)}

    def examples_per_second(self) -> float:
        """Training throughput over all steps."""
        seconds = sum(s.seconds for s in self.steps)
        return sum(s.examples for s in self.steps) / seconds if seconds else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"steps": [vars(s) for s in self.steps], "evals": [vars(e) for e in self.evals],
                "diverged_at_step": self.diverged_at_step}
