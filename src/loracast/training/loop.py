"""The training loop for sequence classification: batches, AdamW, evaluation, history.

The loop works on global batches: the runtime picks this process's rows of each batch, so a
distributed runtime sees the same sequence of global batches as one process would. The loss
is computed here, in float32 from the model's logits, whatever dtype the model computes in.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loracast.quant.base import repacks_in_eval
from loracast.training.data import LabelledTexts
from loracast.training.progress import ProgressBar
from loracast.training.runtime import Runtime


@dataclass
class LoopSettings:
    """Optimisation settings of one run."""

    epochs: int = 1
    lr: float = 3e-3
    batch_size: int = 32  # global batch: split across processes when distributed
    max_length: int = 64  # tokens per text; longer texts are truncated
    seed: int = 0
    warmup_fraction: float = 0.1  # share of steps with a linearly rising learning rate
    weight_decay: float = 0.0
    evals_per_epoch: int = 4  # evaluations per epoch besides the one before training


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
    """One evaluation on the held-out set."""

    step: int
    accuracy: float
    loss: float


@dataclass
class History:
    """What a run recorded; the source of metrics.json and the plots."""

    steps: list[StepRecord] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)
    diverged_at_step: int | None = None  # first step whose loss was not finite

    @property
    def accuracy_before(self) -> float:
        """Eval accuracy before the first step."""
        return self.evals[0].accuracy

    @property
    def accuracy_after(self) -> float:
        """Eval accuracy after the last step."""
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


Tokenizer = Callable[..., Any]


def encode(tokenizer: Tokenizer, texts: list[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Token ids and attention mask for `texts`, padded to the longest, on `device`."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {key: value.to(device) for key, value in batch.items()}


def classification_loss(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy in float32, logits) for one batch."""
    logits = model(**inputs).logits
    return F.cross_entropy(logits.float(), labels), logits


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model.eval()` inside the block, then the previous modes back.

    bitsandbytes 4-bit layers stay in training mode (they have no dropout, so their output is the
    same): on a CPU with AVX512-BF16 their eval-mode forward repacks the weight in place into
    another layout, which fails for layers narrower than a quantization block and changes the
    weight that training then sees.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    for module in model.modules():
        if repacks_in_eval(module):
            module.training = True
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Tokenizer, data: LabelledTexts, batch_size: int, max_length: int,
             device: torch.device, runtime: Runtime | None = None) -> tuple[float, float]:
    """(accuracy, mean loss) of `model` on `data` in eval mode (see `eval_mode`); with a
    distributed `runtime` each process evaluates its share and the counts are summed."""
    mine = data.subset(runtime.shard(range(len(data)))) if runtime is not None else data
    correct, loss_sum = 0, 0.0
    with eval_mode(model):
        for start in range(0, len(mine), batch_size):
            texts = mine.texts[start:start + batch_size]
            labels = torch.tensor(mine.labels[start:start + batch_size], device=device)
            loss, logits = classification_loss(model, encode(tokenizer, texts, max_length, device), labels)
            correct += int((logits.argmax(-1) == labels).sum())
            loss_sum += float(loss) * len(texts)
    if runtime is not None:
        correct, loss_sum = runtime.sum([correct, loss_sum])
    return correct / len(data), loss_sum / len(data)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The learning-rate multiplier at `step`: linear warm-up over `warmup` steps, then linear decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train_classifier(model: nn.Module, tokenizer: Tokenizer, train: LabelledTexts, held_out: LabelledTexts,
                     settings: LoopSettings, runtime: Runtime, label: str = "train") -> tuple[History, torch.optim.Optimizer]:
    """Train the parameters of `model` that require grad; evaluate before, during and after.

    Returns the history and the optimizer (its state shows what the adapters cost in memory).
    A non-finite loss stops the run; `History.diverged_at_step` names the step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; check target_modules and modules_to_save")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warmup = max(1, int(total * settings.warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    eval_at = _eval_steps(steps_per_epoch, settings.epochs, settings.evals_per_epoch)
    generator = torch.Generator().manual_seed(settings.seed)
    forward = runtime.wrap(model)
    history = History()
    progress = ProgressBar(total, label=label, enabled=runtime.is_main)

    def run_eval(step: int) -> None:
        accuracy, loss = evaluate(model, tokenizer, held_out, settings.batch_size * 2, settings.max_length,
                                  runtime.device, runtime)
        history.evals.append(EvalRecord(step, accuracy, loss))
        progress.message(f"{label}: step {step}/{total} eval accuracy {accuracy:.1%} (loss {loss:.4f})")

    run_eval(0)
    model.train()
    step = 0
    for _epoch in range(settings.epochs):
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in range(0, len(order), settings.batch_size):
            began = time.perf_counter()
            global_rows = order[start:start + settings.batch_size]
            rows, weight = runtime.share(global_rows)
            batch = train.subset(rows)
            labels = torch.tensor(batch.labels, device=runtime.device)
            loss, _ = classification_loss(forward, encode(tokenizer, batch.texts, settings.max_length,
                                                          runtime.device), labels)
            value = runtime.mean(loss.detach().item(), len(rows) if weight else 0)
            if not math.isfinite(value):
                history.diverged_at_step = step + 1
                progress.message(f"{label}: loss is {value} at step {step + 1}; stopping (the adapters overflowed "
                                 "or the learning rate is too high)")
                break
            (loss * weight).backward()  # weight 1.0 in one process
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - began
            history.steps.append(StepRecord(step, step / steps_per_epoch, value, seconds, len(global_rows)))
            progress.update(step, value, len(global_rows))
            if step in eval_at:
                run_eval(step)
        if history.diverged_at_step is not None:
            break
    progress.close()
    if history.evals[-1].step != step:
        run_eval(step)
    return history, optimizer


def _eval_steps(steps_per_epoch: int, epochs: int, per_epoch: int) -> set[int]:
    per_epoch = max(1, per_epoch)
    marks = set()
    for epoch in range(epochs):
        for k in range(1, per_epoch + 1):
            marks.add(epoch * steps_per_epoch + round(k * steps_per_epoch / per_epoch))
    return marks
