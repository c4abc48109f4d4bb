"""Gated MLP blocks whose activation is recomputed in backward instead of kept.

The gated MLP of Llama-family models computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``.
In training, autograd keeps four tensors of the intermediate width per layer and token: the gate
projection (for the activation's backward), the activation's output and the up projection (for
the product's backward), and the product (for the down projection's adapter). The activation's
output is the cheapest of them to make again: one element-wise function of the kept gate
projection. `RecomputedGatedMlp` runs the activation and the product under
`torch.utils.checkpoint`, so backward keeps the gate and up projections and recomputes the
activation from them: a quarter of the MLP's kept activations (on SmolLM2-135M with batches of
8 triage conversations, about 95 MB of a step's 1.05 GB) for one element-wise activation per
layer in backward. The same operations run on the same inputs, so outputs and gradients are bit
for bit those of the model's own MLP.

`recompute_gated_activations` swaps it in for every MLP whose own forward it reproduces (checked
on a probe input, bit for bit, per MLP class), keeping the projections as children under the same
names: parameter names, adapter files and merges are unchanged. `restore_gated_mlps` puts the
model's own modules back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _gated(activation: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return activation(gate) * up


class RecomputedGatedMlp(nn.Module):
    """A gated MLP (`original`'s projections and activation) whose activation is recomputed in
    backward when training (see the module docstring)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.gate_proj = original.gate_proj
        self.up_proj = original.up_proj
        self.down_proj = original.down_proj
        self.act_fn = original.act_fn
        self.original = (original,)  # not a child: the model's parameter names stay its own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        up = self.up_proj(x)
        if self.training and torch.is_grad_enabled():
            hidden = checkpoint(_gated, self.act_fn, gate, up, use_reentrant=False, preserve_rng_state=False)
        else:
            hidden = _gated(self.act_fn, gate, up)
        return self.down_proj(hidden)


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Module) for name in (*_PROJECTIONS, "act_fn"))


@torch.no_grad()
def _reproduces(mlp: nn.Module) -> bool:
    """Whether `RecomputedGatedMlp` computes `mlp`'s own forward bit for bit on a probe input."""
    weight = next((p for p in mlp.parameters() if p.is_floating_point()), None)
    features = getattr(mlp.gate_proj, "in_features", None)
    if weight is None or not isinstance(features, int):
        return False
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(2, 3, features, generator=generator).to(device=weight.device, dtype=weight.dtype)
    was_training = mlp.training
    mlp.eval()
    try:
        own = mlp(probe)
        swapped = RecomputedGatedMlp(mlp).eval()(probe)
    except (RuntimeError, TypeError, ValueError):
        return False
    finally:
        mlp.train(was_training)
    return isinstance(own, torch.Tensor) and own.shape == swapped.shape and torch.equal(own, swapped)


def recompute_gated_activations(model: nn.Module) -> int:
    """Swap `RecomputedGatedMlp` in for every gated MLP of `model` whose forward it reproduces;
    returns how many were swapped (0 leaves the model unchanged)."""
    verdicts: dict[type, bool] = {}
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, RecomputedGatedMlp) or not _is_gated_mlp(child):
                continue
            if type(child) not in verdicts:
                verdicts[type(child)] = _reproduces(child)
            if verdicts[type(child)]:
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, RecomputedGatedMlp(child).train(child.training))
    return len(swaps)


def restore_gated_mlps(model: nn.Module) -> int:
    """Put back the model's own MLP modules where `recompute_gated_activations` swapped them;
    returns how many."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, RecomputedGatedMlp)]
    for parent, name, child in swaps:
        original = child.original[0]
        for projection in (*_PROJECTIONS, "act_fn"):  # adapters may have been added or merged meanwhile
            setattr(original, projection, getattr(child, projection))
        setattr(parent, name, original.train(child.training))
    return len(swaps)
