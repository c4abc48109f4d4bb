"""A minimal quantized linear layer and its `QuantBackend`, to test code written against the protocol.

The layer stores int8 codes with one float scale per output row, the codes kept in a tensor of
any dtype (int8, uint8-like integer storage, or a float "carrier" as bitsandbytes' quant_storage
allows), and declares the dtype it computes in, like bitsandbytes' `Linear4bit.compute_dtype`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loracast.quant import base as quant_base


class FakeQuantLinear(nn.Module):
    """``y = x @ (codes * scale).T`` computed in `compute_dtype`; codes stored in `storage`."""

    def __init__(self, linear: nn.Linear, storage: torch.dtype, compute: torch.dtype | None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
        codes = torch.round(weight / scale).clamp(-127, 127)
        self.weight = nn.Parameter(codes.to(storage), requires_grad=False)
        self.register_buffer("scale", scale)
        self.compute_dtype = compute

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        return (x.to(dtype) @ self.dequantized().to(dtype).T).to(x.dtype)


class FakeQuantBackend:
    """`QuantBackend` for `FakeQuantLinear`."""

    name = "fake-int8"

    def handles(self, module: nn.Module) -> bool:
        return isinstance(module, FakeQuantLinear)

    def storage_dtype(self, module: nn.Module) -> torch.dtype:
        return module.weight.dtype

    def compute_dtype(self, module: nn.Module) -> torch.dtype | None:
        return module.compute_dtype

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.dequantized()

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        codes = torch.round(weight.float() / module.scale).clamp(-127, 127)
        module.weight.data = codes.to(module.weight.dtype)

    def snapshot(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach().clone()

    def restore(self, module: nn.Module, state: torch.Tensor) -> None:
        module.weight.data = state.clone()


def register() -> FakeQuantBackend:
    """Register the backend (undo with `unregister`)."""
    backend = FakeQuantBackend()
    quant_base.register_backend(backend)
    return backend


def unregister() -> None:
    """Remove the backend from loracast's registry."""
    quant_base._BACKENDS[:] = [b for b in quant_base._BACKENDS if b.name != FakeQuantBackend.name]


def quantize(model: nn.Module, storage: torch.dtype, compute: torch.dtype | None,
             names: tuple[str, ...] = ("q_proj", "v_proj")) -> nn.Module:
    """Replace the linear layers whose name ends with one of `names` by `FakeQuantLinear`s."""
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in names:
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name), child, FakeQuantLinear(module, storage, compute))
    return model


@pytest.fixture
def fake_backend():
    """The fake backend registered for one test."""
    backend = register()
    yield backend
    unregister()
