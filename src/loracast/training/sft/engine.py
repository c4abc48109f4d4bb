"""The SFT engine: transformers' `Trainer` (loracast's subclass for adapter models) with what
instruction tuning needs and the trainer lacks.

The trainer runs the loop, gradient accumulation, the learning-rate schedule, checkpoints,
resuming, distributed launch (torchrun, accelerate) and the experiment trackers. This module
adds:
- the loss on the assistant's tokens, projecting only the labelled positions onto the
  vocabulary (`loss.AssistantLoss`), normalised over the tokens of the whole global batch (all
  accumulated batches of all processes), as transformers normalises its own causal-LM loss;
- length-grouped batches (`batches.LengthGroupedBatches`) and the padding collator;
- a held-out evaluation that generates the answers greedily and scores them exactly, with the
  held-out loss, split across processes (``eval_exact_match`` can select the best adapter);
- a per-step record (loss, trained tokens, seconds) in the trainer's log history, so that a
  resumed run's metrics hold its whole history;
- complete-only checkpoints (`common.checkpoints`) and a tqdm progress bar with loss and tokens/s;
- the C heap's freed pages handed back after each evaluation (`common.heap`): training does not
  reuse the generation's caches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers.trainer_callback import PrinterCallback

from loracast.distributed.runtime import rank_share
from loracast.training.common import checkpoints
from loracast.training.common.heap import return_freed_memory
from loracast.training.common.history import EvalRecord, History, StepRecord
from loracast.training.common.progress import ProgressBar, StepClock, stops_on_divergence
from loracast.training.sft.batches import LengthGroupedBatches, PadToLongest, collate
from loracast.training.sft.data import ChatExample
from loracast.training.sft.evaluate import Score, answer_examples, score_answers
from loracast.training.sft.loss import AssistantLoss
from loracast.training.sft.packing import PackedCollator, PackedRow
from loracast.training.sft.settings import SftSettings
from loracast.training.sft.template import EncodedExample
from loracast.training.trainers import Trainer


@dataclass
class Evaluation:
    """One evaluation: the exact score of the greedy answers and the held-out loss."""

    step: int
    score: Score
    loss: float
    answers: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (answers left out: samples.jsonl holds them)."""
        return {"step": self.step, **self.score.to_dict(), "loss": self.loss, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, payload: dict[str, Any], answers: list[str]) -> Evaluation:
        """The evaluation `to_dict` wrote, with its answers."""
        score = Score(payload["exact"], payload.get("valid_json"), dict(payload.get("fields") or {}))
        return cls(int(payload["step"]), score, float(payload["loss"]), answers, float(payload["seconds"]))


@dataclass
class SftHistory(History):
    """What an SFT run recorded: steps, and evaluations whose accuracy is the exact-match score."""

    evaluations: list[Evaluation] = field(default_factory=list)
    head_on_labelled_only: bool | None = None  # whether the loss projected only labelled positions (loss.py)

    def tokens_per_second(self) -> float:
        """Trained-on tokens (padding excluded) per second of training steps."""
        seconds = sum(s.seconds for s in self.steps)
        return sum(s.tokens for s in self.steps) / seconds if seconds else math.nan


class _Forward(nn.Module):
    """Calls the sharded model: handed to the trainer as the wrapped model, so that accelerate
    does not wrap an FSDP2 model in DDP (its gradients are already reduced by FSDP)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


DCP_OPTIMIZER = "optimizer_shards"  # a sharded run's optimizer state: torch.distributed.checkpoint, every process


class SftTrainer(checkpoints.CompleteCheckpoints, Trainer):
    """transformers' `Trainer` for LoRA instruction tuning (see the module docstring).

    ``model`` is a loracast `PeftModel`; ``train`` the encoded training examples; ``held_out``
    and ``held_out_encoded`` the held-out conversations (for the greedy answers) and their
    encodings (for the loss). Checkpoints go to ``args.output_dir`` and are marked with
    ``identity``. ``release_heap`` (default on) hands the C heap's freed pages back after each
    evaluation (`loracast.training.common.heap`).
    """

    # compute_loss divides by the global batch's labelled-token count (num_items_in_batch)
    loss_is_scaled_for_ga = True

    def __init__(self, model: Any, args: Any, *, tokenizer: Any, train: Sequence[EncodedExample | PackedRow],
                 held_out: Sequence[ChatExample], held_out_encoded: Sequence[EncodedExample], settings: SftSettings,
                 identity: checkpoints.RunIdentity, label: str = "train", sharded: Any = None,
                 release_heap: bool = True, **kwargs: Any) -> None:
        self.clock = StepClock()
        self.progress = ProgressBar(label)
        self.release_heap = release_heap
        callbacks = [self.clock, self.progress, *kwargs.pop("callbacks", [])]
        super().__init__(model, args, train_dataset=list(train), eval_dataset=list(held_out_encoded),
                         data_collator=(PackedCollator if settings.packing else PadToLongest)(tokenizer.pad_token_id),
                         callbacks=callbacks, **kwargs)
        self.remove_callback(PrinterCallback)  # the progress bar and the summary report; no raw log dicts on stdout
        # the labelled-token count of each global batch is what the loss is normalised by
        self.model_accepts_loss_kwargs = True
        self.tokenizer = tokenizer
        self.settings = settings
        self.identity = identity
        self.label = label
        self.held_out = list(held_out)
        self.held_out_encoded = list(held_out_encoded)
        self.loss_of = AssistantLoss(self.model)
        self.sharded = sharded
        self._forward = _Forward(self.model) if sharded is not None else None
        self.evaluations: list[Evaluation] = []
        self.diverged_at_step: int | None = None
        self._tokens = 0
        self._examples = 0

    def get_train_dataloader(self) -> DataLoader:
        """Length-grouped batches, sharded by accelerate across processes (see `batches`)."""
        lengths = [len(e.input_ids) for e in self.train_dataset]
        sampler = LengthGroupedBatches(lengths, self.settings.batch_size, self.settings.seed)
        return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=sampler,
                                                   collate_fn=self.data_collator, num_workers=0))

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """Cross-entropy of the assistant tokens, summed and divided by the global batch's labelled-token count."""
        tokens, examples = inputs.pop("num_tokens", None), inputs.pop("num_examples", None)  # packed rows' counts
        total, count = self.loss_of.summed(inputs, forward=model)
        if num_items_in_batch is None:
            loss = total / max(count, 1)
        else:
            loss = total / torch.clamp(torch.as_tensor(num_items_in_batch, device=total.device), min=1)
            if self.args.average_tokens_across_devices:
                # DDP averages the gradients of the processes; each one's share of the global sum is scaled back up
                loss = loss * self.accelerator.num_processes
        if model.training:
            self._tokens += int(tokens if tokens is not None else inputs["attention_mask"].sum())
            self._examples += int(examples if examples is not None else inputs["input_ids"].shape[0])
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The trainer's log, with each training step's trained tokens, examples and seconds."""
        if "loss" in logs:
            counts = torch.tensor([self._tokens, self._examples], dtype=torch.float64, device=self.args.device)
            if self.args.world_size > 1:
                torch.distributed.all_reduce(counts)
            logs["tokens"], logs["examples"] = int(counts[0]), int(counts[1])
            logs["step_seconds"] = self.clock.seconds
            self._tokens = self._examples = 0
            if self.diverged_at_step is None and stops_on_divergence(self, logs["loss"]):
                self.diverged_at_step = self.state.global_step
        super().log(logs, start_time)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Greedy answers to the held-out conversations scored exactly, and the held-out loss."""
        evaluation = self.evaluate_held_out(self.state.global_step)
        metrics = {f"{metric_key_prefix}_loss": evaluation.loss,
                   f"{metric_key_prefix}_exact_match": evaluation.score.exact}
        if evaluation.score.valid_json is not None:
            metrics[f"{metric_key_prefix}_valid_json"] = evaluation.score.valid_json
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def evaluate_held_out(self, step: int) -> Evaluation:
        """The evaluation at `step`, each process answering its share of the held-out conversations."""
        began = time.perf_counter()
        rank, world = self.args.process_index, self.args.world_size
        if self.sharded is not None:  # every forward is a collective: every process runs every input
            rank, world = 0, 1
        # text rows (language modelling) have no prompt to answer: only their loss is evaluated
        mine = [i for i in rank_share(range(len(self.held_out)), rank, world) if self.held_out[i].has_prompt]
        answers = answer_examples(self.model, self.tokenizer, [self.held_out[i] for i in mine],
                                  self.settings.max_new_tokens, self.settings.eval_batch_size, self.args.device,
                                  synced=self.sharded is not None)
        total, count = self._held_out_loss(list(rank_share(self.held_out_encoded, rank, world)))
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, list(zip(mine, answers)))
            by_index = dict(pair for part in gathered for pair in part)
        else:
            by_index = dict(zip(mine, answers))
        answers = [by_index.get(i, "") for i in range(len(self.held_out))]
        if world > 1:
            sums = torch.tensor([total, count], dtype=torch.float64, device=self.args.device)
            torch.distributed.all_reduce(sums)
            total, count = float(sums[0]), int(sums[1])
        asked = [i for i, e in enumerate(self.held_out) if e.has_prompt]
        score = score_answers([answers[i] for i in asked], [self.held_out[i].reference for i in asked])
        evaluation = Evaluation(step, score, total / count if count else math.nan, answers,
                                time.perf_counter() - began)
        self.evaluations.append(evaluation)
        if self.release_heap:  # generation's caches are freed: the next step need not live beside them
            return_freed_memory()
        valid = "" if score.valid_json is None else f", valid JSON {score.valid_json:.1%}"
        total_steps = self.state.max_steps or self.settings.max_steps or step
        if self.args.process_index == 0:
            self.progress.message(f"{self.label}: step {step}/{total_steps} held-out exact match {score.exact:.1%}"
                                  f"{valid} (assistant-token loss {evaluation.loss:.4f}; {evaluation.seconds:.0f} s)")
        return evaluation

    @torch.no_grad()
    def _held_out_loss(self, encoded: Sequence[EncodedExample]) -> tuple[float, int]:
        model = self.model
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            # batches of the training size: a loss needs every labelled position's float32 logits
            for start in range(0, len(encoded), self.settings.batch_size):
                batch = collate(encoded[start:start + self.settings.batch_size], self.tokenizer.pad_token_id,
                                self.args.device)
                loss, n = self.loss_of.summed(batch)
                total += float(loss)
                count += n
        finally:
            model.train(was_training)
        return total, count

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader: DataLoader | None = None) -> nn.Module:
        if self._forward is not None:
            return self._forward
        return super()._wrap_model(model, training, dataloader)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the adapter; a sharded model's on every process (its shards are gathered), written by the main one."""
        if self.sharded is None:
            super().save_model(output_dir, _internal_call)
            return
        self.sharded.save_pretrained(output_dir or self.args.output_dir, is_main_process=self.args.should_save)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.sharded is None:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        state = get_optimizer_state_dict(self.model, optimizer)  # this process's shards
        dcp.save({"optimizer": state}, checkpoint_id=str(Path(output_dir) / DCP_OPTIMIZER))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), str(Path(output_dir) / "scheduler.pt"))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if self.sharded is None or checkpoint is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        state = {"optimizer": get_optimizer_state_dict(self.model, optimizer)}
        dcp.load(state, checkpoint_id=str(Path(checkpoint) / DCP_OPTIMIZER))
        set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state["optimizer"])
        self.lr_scheduler.load_state_dict(torch.load(str(Path(checkpoint) / "scheduler.pt"), weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self.sharded is None:  # a sharded run loaded the checkpoint's adapter before sharding
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def history(self) -> SftHistory:
        """Every training step and evaluation of the run, resumed parts included (from the log history)."""
        history = SftHistory(diverged_at_step=self.diverged_at_step, head_on_labelled_only=self.loss_of.split)
        for entry in self.state.log_history:
            if "loss" in entry and "tokens" in entry:
                history.steps.append(StepRecord(int(entry["step"]), float(entry.get("epoch") or 0.0),
                                                float(entry["loss"]), float(entry.get("step_seconds") or 0.0),
                                                int(entry.get("examples") or 0), int(entry["tokens"])))
            elif "eval_exact_match" in entry:
                history.evals.append(EvalRecord(int(entry["step"]), float(entry["eval_exact_match"]),
                                                float(entry["eval_loss"])))
        return history
