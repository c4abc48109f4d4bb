"""One training step that also measures what autograd keeps for backward: the oracle of the tests
of recomputation (the same loss and gradients, fewer bytes kept)."""

from __future__ import annotations

import torch
from torch import nn


def step_keeping_count(model: nn.Module, batch: dict[str, torch.Tensor], seed: int = 2
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(loss, trainable parameters' gradients, bytes kept for backward) of one training forward and
    backward of `model` on `batch`, with the RNG seeded (the same dropout masks on every call)."""
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.train()
    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(kept.values())
