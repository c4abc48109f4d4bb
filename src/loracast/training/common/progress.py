"""What a run shows while it trains: tqdm's bar with the loss and throughput (tokens/s for SFT,
examples/s for the classifier) on the main process, evaluation lines above it, and the clock that
times each optimizer step."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from transformers import TrainerCallback


class StepClock(TrainerCallback):
    """Seconds of the optimizer step in progress (evaluations and saving excluded)."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.seconds = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.began = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds = time.perf_counter() - self.began


class ProgressBar(TrainerCallback):
    """tqdm's bar on the main process: steps, time left, the last loss and throughput; evaluation lines above it.

    `counted` is the key of the step's log that the throughput counts (``tokens`` or ``examples``),
    shown per second as `unit`.
    """

    def __init__(self, label: str, counted: str = "tokens", unit: str = "tok") -> None:
        self.label = label
        self.counted = counted
        self.unit = unit
        self.bar: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            interactive = sys.stderr.isatty()
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.label, unit="step",
                            file=sys.stderr, dynamic_ncols=True, mininterval=0.5 if interactive else 30.0)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.bar is not None and logs and "loss" in logs:
            seconds = logs.get("step_seconds") or math.nan
            self.bar.set_postfix_str(f"loss {logs['loss']:.4f}, {logs.get(self.counted, 0) / seconds:.0f} {self.unit}/s",
                                     refresh=False)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def message(self, text: str) -> None:
        """Print `text` on its own line (above the bar while it runs)."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)


def stops_on_divergence(trainer: Any, loss: float) -> bool:
    """Whether `loss` (a logged training loss) is not finite; if so, tells `trainer` (a Trainer
    with a `label` and a `progress` bar) to stop after this step and says why on its bar."""
    if math.isfinite(loss):
        return False
    trainer.control.should_training_stop = True
    trainer.progress.message(f"{trainer.label}: loss is {loss} at step {trainer.state.global_step}; "
                             "stopping (the adapters overflowed or the learning rate is too high)")
    return True
