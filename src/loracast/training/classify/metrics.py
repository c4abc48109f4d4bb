"""What a classifier run measured, typed: the source of its metrics.json and of the printed summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from loracast.training.classify.settings import ClassifySettings
from loracast.training.common.history import History


@dataclass
class LoraSummary:
    """The adapter's settings, as the saved config holds them."""

    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: Any  # a sorted list, or a name such as "all-linear"
    modules_to_save: list[str] | None


@dataclass
class TrainSummary:
    """The run's settings and what training did."""

    settings: ClassifySettings
    examples: int
    steps: int
    processes: int
    global_batch: int
    resumed_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the settings' fields beside the counts."""
        counts = {k: v for k, v in asdict(self).items() if k != "settings"}
        return {**asdict(self.settings), **counts}


@dataclass
class EvalSummary:
    """Held-out accuracy before and after training."""

    examples: int
    accuracy_before: float
    accuracy_after: float
    best_checkpoint: str | None = None  # with load_best: the checkpoint whose adapter the run ends with


@dataclass
class Seconds:
    """Where the time went: loading the model, training (with its evaluations)."""

    load: float
    train: float


@dataclass
class Files:
    """What the run wrote."""

    adapter: str
    metrics: str
    plot: str
    checkpoints: str | None = None


@dataclass
class ClassifyMetrics:
    """Everything a classifier run reports."""

    loracast_version: str
    model: str
    model_name: str
    data: str
    labels: list[str]
    policy: str
    base_dtype: str
    adapter_dtypes: dict[str, int]
    lora: LoraSummary
    train: TrainSummary
    eval: EvalSummary
    precision_summary: dict[str, Any]  # common.report's table, shared with the SFT job
    seconds: Seconds
    history: History = field(default_factory=History)
    files: Files | None = None
    task: str = "classify"

    @property
    def diverged_at_step(self) -> int | None:
        """The first step whose loss was not finite (training stopped there), or None."""
        return self.history.diverged_at_step

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (metrics.json)."""
        return {"loracast_version": self.loracast_version, "task": self.task, "model": self.model,
                "model_name": self.model_name, "data": self.data, "labels": self.labels, "policy": self.policy,
                "base_dtype": self.base_dtype, "adapter_dtypes": self.adapter_dtypes, "lora": asdict(self.lora),
                "train": self.train.to_dict(), "eval": asdict(self.eval), "diverged_at_step": self.diverged_at_step,
                "precision_summary": self.precision_summary, "seconds": asdict(self.seconds),
                "history": self.history.to_dict(), **({"files": asdict(self.files)} if self.files else {})}
