"""The classifier's held-out evaluation: accuracy and mean float32 cross-entropy, in eval mode."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loracast.quant.base import repacks_in_eval
from loracast.training.classify.data import LabelledTexts

Tokenizer = Callable[..., Any]


def encode(tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Token ids and attention mask for `texts`, padded to the longest, truncated to `max_length` tokens."""
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def summed_loss(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy summed over the batch, in float32 whatever dtype the model computes in; logits)."""
    logits = model(**inputs).logits
    return F.cross_entropy(logits.float(), labels, reduction="sum"), logits


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
def correct_and_loss(model: nn.Module, tokenizer: Tokenizer, data: LabelledTexts, batch_size: int, max_length: int,
                     device: torch.device) -> tuple[int, float]:
    """(correctly labelled rows, summed loss) of `model` on `data`, in eval mode (see `eval_mode`)."""
    correct, loss_sum = 0, 0.0
    with eval_mode(model):
        for start in range(0, len(data), batch_size):
            inputs = {k: v.to(device) for k, v in encode(tokenizer, data.texts[start:start + batch_size],
                                                         max_length).items()}
            labels = torch.tensor(data.labels[start:start + batch_size], device=device)
            loss, logits = summed_loss(model, inputs, labels)
            correct += int((logits.argmax(-1) == labels).sum())
            loss_sum += float(loss)
    return correct, loss_sum
