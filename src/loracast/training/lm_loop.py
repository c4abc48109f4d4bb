"""The training loop for supervised fine-tuning of a causal LM: length-grouped batches, AdamW
with warm-up and linear decay, the loss on assistant tokens only, and evaluations (greedy answers
scored exactly, and the held-out loss) before and after training.

The loss is transformers' causal-LM loss (computed in float32 from the logits, over the tokens
whose label is not ignored), so a step here is the step a transformers or TRL user runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loracast.training.chat_data import ChatExample
from loracast.training.chat_template import EncodedExample
from loracast.training.lm_batching import collate, length_grouped_batches
from loracast.training.lm_eval import Score, answer_examples, assistant_loss, score_answers
from loracast.training.lm_loss import AssistantLoss
from loracast.training.loop import EvalRecord, History, StepRecord, lr_factor
from loracast.training.progress import ProgressBar


@dataclass
class SftSettings:
    """Optimisation and evaluation settings of one SFT run."""

    max_steps: int | None = 60  # None: whole epochs
    epochs: int = 1  # used when max_steps is None
    lr: float = 2e-3
    batch_size: int = 8
    max_length: int = 256  # longer examples are skipped (counted), never truncated
    seed: int = 0
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    max_new_tokens: int = 48  # per generated evaluation answer
    eval_batch_size: int = 32


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


@dataclass
class SftHistory(History):
    """What an SFT run recorded: steps, and evaluations whose accuracy is the exact-match score."""

    evaluations: list[Evaluation] = field(default_factory=list)
    head_on_labelled_only: bool | None = None  # whether the loss projected only labelled positions (lm_loss)

    def tokens_per_second(self) -> float:
        """Trained-on tokens (padding excluded) per second of training steps."""
        seconds = sum(s.seconds for s in self.steps)
        return sum(s.tokens for s in self.steps) / seconds if seconds else math.nan


def total_steps(settings: SftSettings, examples: int) -> int:
    """How many optimizer steps `settings` ask for on `examples` training examples."""
    per_epoch = math.ceil(examples / settings.batch_size)
    return settings.max_steps if settings.max_steps is not None else per_epoch * settings.epochs


def evaluate_lm(model: nn.Module, tokenizer: Any, examples: Sequence[ChatExample], encoded: Sequence[EncodedExample],
                settings: SftSettings, device: torch.device, step: int) -> Evaluation:
    """Greedy answers to `examples`, their exact score, and the loss on `encoded`'s assistant tokens."""
    began = time.perf_counter()
    answers = answer_examples(model, tokenizer, examples, settings.max_new_tokens, settings.eval_batch_size, device)
    score = score_answers(answers, [e.reference for e in examples])
    # the loss batch is the training batch: a loss needs the full-vocabulary logits of every
    # position (float32 for the cross-entropy), which a generation batch of 32 makes gigabytes
    loss = assistant_loss(model, encoded, tokenizer.pad_token_id, settings.batch_size, device)
    return Evaluation(step, score, loss, answers, time.perf_counter() - began)


def train_sft(model: nn.Module, tokenizer: Any, train: Sequence[EncodedExample], held_out: Sequence[ChatExample],
              held_out_encoded: Sequence[EncodedExample], settings: SftSettings, device: torch.device,
              label: str = "train") -> tuple[SftHistory, torch.optim.Optimizer]:
    """Train the parameters of `model` that require grad on `train`; evaluate on `held_out` before
    and after. A non-finite loss stops the run (`History.diverged_at_step` names the step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; check --target-modules")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    total = total_steps(settings, len(train))
    warmup = max(1, int(total * settings.warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    generator = torch.Generator().manual_seed(settings.seed)
    lengths = [len(e.input_ids) for e in train]
    history = SftHistory()
    loss_of = AssistantLoss(model)
    progress = ProgressBar(total, label=label, unit="tok")

    def run_eval(step: int) -> None:
        evaluation = evaluate_lm(model, tokenizer, held_out, held_out_encoded, settings, device, step)
        history.evaluations.append(evaluation)
        history.evals.append(EvalRecord(step, evaluation.score.exact, evaluation.loss))
        valid = "" if evaluation.score.valid_json is None else f", valid JSON {evaluation.score.valid_json:.1%}"
        progress.message(f"{label}: step {step}/{total} held-out exact match {evaluation.score.exact:.1%}{valid} "
                         f"(assistant-token loss {evaluation.loss:.4f}; {evaluation.seconds:.0f} s)")

    run_eval(0)
    progress.restart_clock()  # tokens/s and time left count training steps only
    model.train()
    step, epoch = 0, 0
    while step < total and history.diverged_at_step is None:
        for rows in length_grouped_batches(lengths, settings.batch_size, generator):
            began = time.perf_counter()
            batch = collate([train[i] for i in rows], tokenizer.pad_token_id, device)
            loss = loss_of(batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                history.diverged_at_step = step + 1
                progress.message(f"{label}: loss is {value} at step {step + 1}; stopping (the adapters overflowed "
                                 "or the learning rate is too high)")
                break
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens = int(batch["attention_mask"].sum())
            seconds = time.perf_counter() - began
            history.steps.append(StepRecord(step, epoch + len(history.steps) / max(1, len(lengths)), value, seconds,
                                            len(rows), tokens))
            progress.update(step, value, tokens)
            if step >= total:
                break
        epoch += 1
    progress.close()
    history.head_on_labelled_only = loss_of.split
    run_eval(step)
    return history, optimizer
