"""The causal-LM loss on assistant tokens, with the vocabulary projection computed only where a
label is kept.

transformers' causal-LM loss projects every position onto the whole vocabulary (49,152 logits a
token for SmolLM2), upcasts them to float32, and then ignores the positions whose label is -100:
in instruction tuning that is every prompt token, most of a conversation. `AssistantLoss` hands
the model's output head only the hidden states whose next token is labelled (a forward pre-hook
on the head, active only inside its own calls), so the model returns the logits of those
positions alone: the same float32 cross-entropy over the same tokens, with a fraction of the
head's compute and of the logits' memory. The model is called as a whole (through a DDP or FSDP
wrapper when there is one), so distributed training sees an ordinary forward.

It applies where the logits are ``head(hidden)`` followed by element-wise steps (a soft cap
keeps working). That is checked on the first batch against the model's own loss; where it fails,
or where the head is handed something other than every position, the logits are selected after
the head instead (the same loss, at the full projection's cost).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loracast.training.sft.template import IGNORE_INDEX

# the first batch's loss both ways must agree this closely (relative) for the split path to be used;
# the two differ only by matmul blocking over different row counts
AGREEMENT = 1e-3


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that projects hidden states onto the vocabulary (LoRA-wrapped or not), if the
    model (a transformers causal LM, or an adapter model around one) names one."""
    get_head = getattr(_unwrapped(model), "get_output_embeddings", None)
    try:
        head = get_head() if get_head is not None else None
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Module) else None


CHUNK_BYTES = 8 * 2**20  # float32 rows of logits widened at a time


def _row_chunks(logits: torch.Tensor) -> range:
    return range(0, logits.shape[0], max(1, CHUNK_BYTES // (4 * max(1, logits.shape[-1]))))


class SummedCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(logits.float(), targets, reduction="sum")`` over (rows, vocabulary)
    logits, widened to float32 a few rows at a time, keeping only the logits themselves for
    backward.

    The whole-tensor form keeps the float32 log-probabilities of every labelled position for
    backward and widens all the logits at once (on SmolLM2, 288 labelled positions of a batch:
    57 MB each for the widened logits, the log-probabilities and two gradients, at the moment the
    step's activations are all held). Here forward and backward each widen a chunk of rows
    (`CHUNK_BYTES`), and backward makes the chunk's log-probabilities again: the same float32
    operations per row, so the gradients are bit for bit the whole-tensor form's; the loss sums
    the chunks' sums, which rounds in another order (a few float32 ulps).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros((), dtype=torch.float32)
        for start in _row_chunks(logits):
            rows = slice(start, start + _row_chunks(logits).step)
            total = total + F.cross_entropy(logits[rows].float(), targets[rows], reduction="sum")
        ctx.save_for_backward(logits, targets)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        logits, targets = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        chunks = _row_chunks(logits)
        for start in chunks:
            rows = slice(start, start + chunks.step)
            log_probabilities = torch.log_softmax(logits[rows].float(), 1)
            _, total_weight = torch.ops.aten.nll_loss_forward(log_probabilities, targets[rows], None, 2, IGNORE_INDEX)
            grad_log = torch.ops.aten.nll_loss_backward(grad, log_probabilities, targets[rows], None, 2, IGNORE_INDEX,
                                                        total_weight)
            grad_logits[rows] = torch._log_softmax_backward_data(grad_log, log_probabilities, 1, torch.float32)
        return grad_logits, None


class AssistantLoss:
    """The training loss of one model on assistant-labelled batches (see the module docstring).

    `summed(batch)` gives (the float32 cross-entropy summed over labelled tokens, their count),
    for losses normalised over several batches; calling the object gives their mean. `split`
    tells, after the first call, whether the head sees only the labelled positions.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.head = output_head(model)
        self.split: bool | None = None if self.head is not None else False
        self._keep: torch.Tensor | None = None

    def _labelled_hidden(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        keep = self._keep
        if keep is None or not args or not isinstance(args[0], torch.Tensor):
            return None
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[0] != keep.shape[0] or hidden.shape[1] != keep.shape[1] + 1:
            return None  # not every position: select from the logits instead
        return (hidden[:, :-1][keep], *args[1:])

    def summed(self, batch: dict[str, torch.Tensor], forward: nn.Module | None = None) -> tuple[torch.Tensor, int]:
        """(summed float32 cross-entropy of each labelled next token, how many there are) of
        `batch`, computed by calling `forward` (default: the model; pass a DDP/FSDP wrapper to
        train through it)."""
        if self.split is None:
            self.split = self._agrees(batch)
        split = bool(self.split)
        labels = batch["labels"]
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        handle = self.head.register_forward_pre_hook(self._labelled_hidden) if split else None
        self._keep = keep if split else None
        try:
            logits = (forward if forward is not None else self.model)(**inputs, use_cache=False).logits
        finally:
            self._keep = None
            if handle is not None:
                handle.remove()
        if logits.dim() == 3:  # the whole projection came back
            logits = logits[:, :-1][keep]
        loss = SummedCrossEntropy.apply(logits, targets[keep])
        return loss, int(keep.sum())

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss, count = self.summed(batch)
        return loss / count  # no labelled token: NaN, as transformers' mean over no tokens

    def _agrees(self, batch: dict[str, torch.Tensor]) -> bool | None:
        first = {k: v[:1] for k, v in batch.items()}
        if not bool((first["labels"][:, 1:] != IGNORE_INDEX).any()):
            first = batch
        if not bool((first["labels"][:, 1:] != IGNORE_INDEX).any()):
            return None  # nothing to compare on: the next batch decides
        was_training = self.model.training
        self.model.eval()  # dropout off: both computations must see the same activations
        try:
            with torch.no_grad():
                reference = float(self.model(**first, use_cache=False).loss)
                self.split = True
                try:
                    split = float(self(first))
                except (RuntimeError, ValueError, IndexError):
                    return False  # the model cannot take the head's shorter output
                finally:
                    self.split = None
        finally:
            self.model.train(was_training)
        return math.isfinite(reference) and abs(split - reference) <= AGREEMENT * max(1.0, abs(reference))
