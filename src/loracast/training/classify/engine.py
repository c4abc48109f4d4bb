"""The classifier engine: transformers' `Trainer` (loracast's subclass for adapter models) with
what training a classification head with LoRA needs and the trainer lacks.

The trainer runs the loop, gradient accumulation, the learning-rate schedule, checkpoints,
resuming, distributed launch (torchrun, accelerate) and the experiment trackers. This module adds:
- the loss in float32 from the model's logits whatever dtype the model computes in, summed and
  divided by the number of examples of the whole global batch (every accumulated batch of every
  process), so that any split of a global batch gives its mean;
- the batch order: one seeded permutation per epoch from one generator, cut into batches
  (`ShuffledBatches`), tokenized per batch and padded to its longest text (`TextCollator`);
- the held-out evaluation (accuracy and loss, split across processes), which
  ``eval_accuracy`` can select the best adapter by;
- a per-step record (loss, examples, seconds) in the trainer's log history, so that a resumed
  run's metrics hold its whole history;
- complete-only checkpoints (`common.checkpoints`) and a tqdm progress bar with loss and examples/s.

Three of the trainer's defaults would change what the run trains, and are set back:
- the warm-up (`warmup_steps`, `ahead_in_warmup`): transformers' schedules give the first step a
  learning rate of 0 (the gradient then only fills AdamW's moments) and round the warm-up up (10 %
  of 30 steps is 3.0000000000000004 in floats: 4 steps). Here the warm-up is the ratio's steps
  rounded down, the first step trains at lr / warm-up, the peak comes at the warm-up's last step,
  and the decay after it is the named schedule's (linear: to lr / (steps - warm-up) at the last
  step);
- the seed: the trainer seeds the random generators again when it is built, after the model was
  initialised from the same seed, so the dropout masks would replay the draws that made the
  adapters and the head. The generators keep their state instead, and the data loader draws its
  worker seed from a generator of its own: dropout draws what follows the initialisation;
- the optimizer: torch's AdamW (``adamw_torch``, set in `run.training_arguments`), not the fused
  kernel transformers picks by default; clipping only with ``max_grad_norm`` > 0 (default 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.utils.data import DataLoader, Sampler
from transformers import get_scheduler
from transformers.trainer_callback import PrinterCallback

from loracast.distributed.runtime import rank_share
from loracast.training.classify.data import LabelledTexts
from loracast.training.classify.evaluate import Tokenizer, correct_and_loss, encode, summed_loss
from loracast.training.classify.settings import ClassifySettings
from loracast.training.common import checkpoints
from loracast.training.common.history import EvalRecord, History, StepRecord
from loracast.training.common.progress import ProgressBar, StepClock, stops_on_divergence
from loracast.training.trainers import Trainer


def steps_per_epoch(rows: int, settings: ClassifySettings, processes: int) -> int:
    """Optimizer steps in one epoch of `rows` training rows on `processes` processes."""
    batches = -(-rows // settings.batch_size)
    per_process = -(-batches // processes)  # accelerate evens the batches out across processes
    return -(-per_process // settings.grad_accum)


def warmup_steps(total: int, ratio: float) -> int:
    """Steps of rising learning rate in a run of `total` steps: the share `ratio`, rounded down
    (at least 1; with 1 the first step already trains at the peak)."""
    return max(1, math.floor(total * ratio + 1e-9))  # 1e-9: 30 * 0.1 is 3.0000000000000004


def ahead_in_warmup(factor: Callable[[int], float], warmup: int) -> Callable[[int], float]:
    """A schedule's learning-rate factor, taken one step ahead during the warm-up: the factor of
    optimizer step k (1-based) is ``factor(k)`` while k <= `warmup`, so the first step trains at
    1 / warmup of the peak instead of 0, then ``factor(k - 1)`` as in the named schedule."""

    def shifted(index: int) -> float:  # index: steps taken so far (the scheduler's count)
        return factor(index + 1) if index < warmup else factor(index)

    return shifted


class ShuffledBatches(Sampler[list[int]]):
    """Batches of indices into `count` rows: each epoch a seeded random permutation cut into
    batches of `batch_size` (the last one shorter), drawn from one generator across epochs, so
    that epoch `e` of a resumed run is epoch `e` of an uninterrupted one."""

    def __init__(self, count: int, batch_size: int, seed: int) -> None:
        self.count = count
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the order of epoch `epoch` next (the trainer calls this as each epoch starts)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch):  # replay the earlier epochs' draws
            torch.randperm(self.count, generator=generator)
        order = torch.randperm(self.count, generator=generator).tolist()
        for start in range(0, self.count, self.batch_size):
            yield order[start:start + self.batch_size]

    def __len__(self) -> int:
        return -(-self.count // self.batch_size)


class TextCollator:
    """The collator: rows ``(text, label id)`` to token ids, attention mask (padded to the batch's
    longest text, truncated at `max_length` tokens) and ``labels``."""

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, rows: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        batch = encode(self.tokenizer, [text for text, _ in rows], self.max_length)
        batch["labels"] = torch.tensor([label for _, label in rows], dtype=torch.long)
        return batch


class ClassifierTrainer(checkpoints.CompleteCheckpoints, Trainer):
    """transformers' `Trainer` for a LoRA text classifier (see the module docstring).

    ``model`` is a loracast `PeftModel`; ``train`` and ``held_out`` the labelled texts.
    Checkpoints go to ``args.output_dir`` and are marked with ``identity``.
    """

    # compute_loss divides by the global batch's example count (num_items_in_batch)
    loss_is_scaled_for_ga = True

    def __init__(self, model: Any, args: Any, *, tokenizer: Tokenizer, train: LabelledTexts, held_out: LabelledTexts,
                 settings: ClassifySettings, identity: checkpoints.RunIdentity, label: str = "train") -> None:
        self.clock = StepClock()
        self.progress = ProgressBar(label, counted="examples", unit="ex")
        generators = _generator_states()
        super().__init__(model, args, train_dataset=list(zip(train.texts, train.labels)),
                         eval_dataset=list(zip(held_out.texts, held_out.labels)),
                         data_collator=TextCollator(tokenizer, settings.max_length),
                         callbacks=[self.clock, self.progress])
        _restore_generators(generators)  # the trainer seeded them again: dropout continues the model's stream
        self.remove_callback(PrinterCallback)  # the progress bar and the summary report; no raw log dicts on stdout
        # the example count of each global batch is what the loss is normalised by
        self.model_accepts_loss_kwargs = True
        self.tokenizer = tokenizer
        self.settings = settings
        self.identity = identity
        self.label = label
        self.held_out = held_out
        self.diverged_at_step: int | None = None
        self._examples = 0

    def get_train_dataloader(self) -> DataLoader:
        """Seeded shuffled batches (`ShuffledBatches`), shared out by accelerate across processes."""
        sampler = ShuffledBatches(len(self.train_dataset), self.settings.batch_size, self.settings.seed)
        # the loader draws a worker seed as each epoch starts: from its own generator, not the one dropout uses
        workers = torch.Generator().manual_seed(self.settings.seed)
        return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=sampler, generator=workers,
                                                   collate_fn=self.data_collator, num_workers=0))

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
                         ) -> LRScheduler:
        """The named schedule (``args.lr_scheduler_type``) over `num_training_steps` steps, with
        `warmup_steps` of warm-up taken one step ahead (`ahead_in_warmup`)."""
        if self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            warmup = warmup_steps(num_training_steps, self.settings.warmup_ratio)
            named = get_scheduler(self.args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=warmup,
                                  num_training_steps=num_training_steps,
                                  scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
            if isinstance(named, LambdaLR):
                named = LambdaLR(optimizer, [ahead_in_warmup(factor, warmup) for factor in named.lr_lambdas])
            self.lr_scheduler = named
            self._created_lr_scheduler = True  # the trainer builds a new one if train() is called again
        return self.lr_scheduler

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """Cross-entropy in float32, summed and divided by the global batch's example count."""
        labels = inputs.pop("labels")
        total, _ = summed_loss(model, inputs, labels)
        if num_items_in_batch is None:
            loss = total / len(labels)
        else:
            loss = total / torch.clamp(torch.as_tensor(num_items_in_batch, device=total.device), min=1)
            if self.args.average_tokens_across_devices:
                # DDP averages the gradients of the processes; each one's share of the global sum is scaled back up
                loss = loss * self.accelerator.num_processes
        if model.training:
            self._examples += len(labels)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The trainer's log, with each training step's examples and seconds."""
        if "loss" in logs:
            count = torch.tensor([self._examples], dtype=torch.float64, device=self.args.device)
            if self.args.world_size > 1:
                torch.distributed.all_reduce(count)
            logs["examples"] = int(count[0])
            logs["step_seconds"] = self.clock.seconds
            self._examples = 0
            if self.diverged_at_step is None and stops_on_divergence(self, logs["loss"]):
                self.diverged_at_step = self.state.global_step
        super().log(logs, start_time)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Accuracy and mean loss on the held-out texts."""
        record = self.evaluate_held_out(self.state.global_step)
        metrics = {f"{metric_key_prefix}_loss": record.loss, f"{metric_key_prefix}_accuracy": record.accuracy}
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def evaluate_held_out(self, step: int) -> EvalRecord:
        """The evaluation at `step`, each process scoring its share of the held-out texts."""
        rank, world = self.args.process_index, self.args.world_size
        mine = self.held_out.subset(list(rank_share(range(len(self.held_out)), rank, world)))
        correct, loss_sum = correct_and_loss(self.model, self.tokenizer, mine, self.settings.batch_size * 2,
                                             self.settings.max_length, self.args.device)
        if world > 1:
            sums = torch.tensor([correct, loss_sum], dtype=torch.float64, device=self.args.device)
            torch.distributed.all_reduce(sums)
            correct, loss_sum = int(sums[0]), float(sums[1])
        record = EvalRecord(step, correct / len(self.held_out), loss_sum / len(self.held_out))
        total_steps = self.state.max_steps or self.planned_steps()
        if self.args.process_index == 0:
            self.progress.message(f"{self.label}: step {step}/{total_steps} eval accuracy {record.accuracy:.1%} "
                                  f"(loss {record.loss:.4f})")
        return record

    def planned_steps(self) -> int:
        """The optimizer steps the run will take (as the trainer counts them before it starts)."""
        if self.settings.max_steps is not None:
            return self.settings.max_steps
        per_epoch = steps_per_epoch(len(self.train_dataset), self.settings, self.args.world_size)
        return math.ceil(self.settings.epochs * per_epoch)

    def history(self) -> History:
        """Every training step and evaluation during training of the run, resumed parts included
        (from the log history)."""
        history = History(diverged_at_step=self.diverged_at_step)
        for entry in self.state.log_history:
            if "loss" in entry and "examples" in entry:
                history.steps.append(StepRecord(int(entry["step"]), float(entry.get("epoch") or 0.0),
                                                float(entry["loss"]), float(entry.get("step_seconds") or 0.0),
                                                int(entry["examples"])))
            elif "eval_accuracy" in entry:
                history.evals.append(EvalRecord(int(entry["step"]), float(entry["eval_accuracy"]),
                                                float(entry["eval_loss"])))
        return history


def _generator_states() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The CPU and (if initialised) CUDA generators' states."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _restore_generators(states: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
