"""The causal-LM loss on assistant tokens, with the vocabulary projection computed only where a
label is kept.

transformers' causal-LM loss projects every position onto the whole vocabulary (49,152 logits a
token for SmolLM2), upcasts them to float32, and then ignores the positions whose label is -100:
in instruction tuning that is every prompt token, most of a conversation. `AssistantLoss` runs the
model's decoder, keeps the hidden states whose next token is labelled, and projects only those:
the same mean float32 cross-entropy over the same tokens, with a fraction of the head's compute
and of the logits' memory.

It applies to models whose logits are ``head(decoder(...).last_hidden_state)``, which is checked
on the first batch against the model's own loss (a model that rescales or soft-caps its logits
fails the check); every other model, and any batch with extra inputs, gets the model's own loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loracast.training.chat_template import IGNORE_INDEX

# the first batch's loss both ways must agree this closely (relative) for the split path to be used;
# the two differ only by matmul blocking over different row counts
AGREEMENT = 1e-3
MODEL_INPUTS = frozenset({"input_ids", "attention_mask", "labels"})


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


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    base = _unwrapped(model)
    get_decoder, head = getattr(base, "get_decoder", None), output_head(model)
    if get_decoder is None or head is None:
        return None
    try:
        decoder = get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(decoder, nn.Module) or decoder is base:
        return None
    return decoder, head


def labelled_positions_loss(decoder: nn.Module, head: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean float32 cross-entropy of the next token at every labelled position of `batch`,
    projecting only those positions' hidden states through `head`."""
    labels = batch["labels"]
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep]).float()  # (kept tokens, vocabulary)
    return F.cross_entropy(logits, targets[keep], reduction="mean")


class AssistantLoss:
    """The training loss of one model on assistant-labelled batches (see the module docstring).

    Call it with a batch of ``input_ids``, ``attention_mask`` and ``labels``; `split` tells,
    after the first call, whether the labelled-positions path is in use.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.parts = _decoder_and_head(model)
        self.split: bool | None = None if self.parts is not None else False

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        if set(batch) != MODEL_INPUTS or not bool((batch["labels"][:, 1:] != IGNORE_INDEX).any()):
            return self.model(**batch).loss
        if self.split is None:
            self.split = self._agrees(batch)
        if not self.split:
            return self.model(**batch).loss
        decoder, head = self.parts
        return labelled_positions_loss(decoder, head, batch)

    def _agrees(self, batch: dict[str, torch.Tensor]) -> bool:
        first = {k: v[:1] for k, v in batch.items()}
        if not bool((first["labels"][:, 1:] != IGNORE_INDEX).any()):
            first = batch
        decoder, head = self.parts
        was_training = self.model.training
        self.model.eval()  # dropout off: both computations must see the same activations
        try:
            with torch.no_grad():
                reference = float(self.model(**first).loss)
                split = float(labelled_positions_loss(decoder, head, first))
        finally:
            self.model.train(was_training)
        return math.isfinite(reference) and abs(split - reference) <= AGREEMENT * max(1.0, abs(reference))
