"""The cheap activations of a decoder layer, recomputed in backward instead of kept: the gated
MLP's activation, and the float32 input of each RMS norm.

The gated MLP of Llama-family models computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``.
In training, autograd keeps four tensors of the intermediate width per layer and token: the gate
projection (for the activation's backward), the activation's output and the up projection (for
the product's backward), and the product (for the down projection's adapter). The activation's
output and the product are cheap to make again: element-wise functions of the gate and up
projections. `RecomputedGatedMlp` runs the activation and the product under
`torch.utils.checkpoint`, and the down projection under saved-tensor hooks that keep a recipe in
place of the product, so backward keeps only the gate and up projections and recomputes the
rest from them: half of the MLP's kept activations (on SmolLM2-135M with a batch of 8 x 135
tokens, about 200 MB of a step's 0.9 GB) for two element-wise passes per layer in backward.
The same operations run on the same inputs, so outputs and gradients are bit for bit those of
the model's own MLP.

An RMS norm widens its bf16 or fp16 input to float32 and keeps that float32 copy for backward:
twice the bytes of the input it came from. `RecomputedNorm` runs the model's own norm under
`torch.utils.checkpoint`, so backward keeps the narrow input and widens it again (an exact
conversion): half of each norm's kept bytes (on SmolLM2-135M, 61 norms, about 70 MB a step),
for one element-wise norm per layer in backward.

`recompute_cheap_activations` swaps both in (the MLP only where it reproduces the MLP's own
forward, checked on a probe input bit for bit per MLP class; the norms for every module whose
class is an RMS norm), keeping parameters and children under the same names: parameter names,
adapter files and merges are unchanged. `restore_modules` puts the model's own modules back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
        if not (self.training and torch.is_grad_enabled()):
            return self.down_proj(_gated(self.act_fn, gate, up))
        hidden = checkpoint(_gated, self.act_fn, gate, up, use_reentrant=False, preserve_rng_state=False)
        with torch.autograd.graph.saved_tensors_hooks(*_recomputed_input(hidden, self.act_fn, gate, up)):
            return self.down_proj(hidden)


class _Recompute:
    """What the down projection keeps in place of its input: the recipe to make it again."""


def _recomputed_input(hidden: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor,
                      up: torch.Tensor) -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]:
    """Saved-tensor hooks under which the down projection keeps, instead of `hidden` itself (the
    product its adapter needs in backward), a marker; backward makes the product again from `gate`
    and `up`, which the recomputed activation keeps anyway: the same operations on the same
    tensors, so the same bits. Every other tensor is kept as it is."""
    marker = _Recompute()

    def pack(tensor: torch.Tensor) -> Any:
        if (tensor.data_ptr() == hidden.data_ptr() and tensor.shape == hidden.shape
                and tensor.stride() == hidden.stride() and tensor.dtype == hidden.dtype):
            return marker
        return tensor

    def unpack(kept: Any) -> torch.Tensor:
        if kept is marker:
            with torch.no_grad():
                return _gated(activation, gate, up)
        return kept

    return pack, unpack


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


class RecomputedNorm(nn.Module):
    """The norm `original` (same parameters, buffers and children, under the same names), run under
    `torch.utils.checkpoint` when training on an input narrower than float32 (see the module
    docstring)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        for name, parameter in original.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, buffer in original.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in original._non_persistent_buffers_set)
        for name, child in original.named_children():
            self.add_module(name, child)
        self.original = (original,)  # not a child: the model's parameter names stay its own

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        norm = self.original[0]
        # an input without gradient (after a frozen embedding) keeps nothing for backward in the first place
        if (self.training and torch.is_grad_enabled() and hidden.requires_grad and hidden.is_floating_point()
                and hidden.element_size() < 4):
            return checkpoint(norm, hidden, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
        return norm(hidden, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"recomputed in backward: {self.original[0]!r}"


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter)


@dataclass
class Recomputed:
    """How many modules of each kind `recompute_cheap_activations` swapped."""

    gated_mlps: int = 0
    norms: int = 0

    def to_dict(self) -> dict[str, int]:
        """JSON-ready form (metrics.json)."""
        return {"gated_mlp_activations": self.gated_mlps, "rms_norm_inputs": self.norms}


def recompute_cheap_activations(model: nn.Module) -> Recomputed:
    """Swap `RecomputedGatedMlp` in for every gated MLP of `model` whose forward it reproduces, and
    `RecomputedNorm` for every RMS norm; returns how many of each (none: the model is unchanged)."""
    verdicts: dict[type, bool] = {}
    mlps: list[tuple[nn.Module, str, nn.Module]] = []
    norms: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, RecomputedGatedMlp | RecomputedNorm):
                continue
            if _is_rms_norm(child):
                norms.append((parent, name, child))
            elif _is_gated_mlp(child):
                if type(child) not in verdicts:
                    verdicts[type(child)] = _reproduces(child)
                if verdicts[type(child)]:
                    mlps.append((parent, name, child))
    for parent, name, child in mlps:
        setattr(parent, name, RecomputedGatedMlp(child).train(child.training))
    for parent, name, child in norms:
        setattr(parent, name, RecomputedNorm(child).train(child.training))
    return Recomputed(len(mlps), len(norms))


def restore_modules(model: nn.Module) -> Recomputed:
    """Put back the model's own modules where `recompute_cheap_activations` swapped them; returns
    how many of each kind."""
    swapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, RecomputedGatedMlp | RecomputedNorm)]
    restored = Recomputed()
    for parent, name, child in swapped:
        original = child.original[0]
        if isinstance(child, RecomputedGatedMlp):
            for projection in (*_PROJECTIONS, "act_fn"):  # adapters may have been added or merged meanwhile
                setattr(original, projection, getattr(child, projection))
            restored.gated_mlps += 1
        else:
            restored.norms += 1
        setattr(parent, name, original.train(child.training))
    return restored
