"""Small models for tests: one of each layer type loracast adapts, and PEFT-side helpers."""

from __future__ import annotations

import torch
from torch import nn


def tiny_llama_config(**overrides):
    """A 2-layer Llama small enough to build in milliseconds."""
    from transformers import LlamaConfig

    values = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    values.update(overrides)
    return LlamaConfig(**values)



class MixedNet(nn.Module):
    """Embedding -> Linear -> GPT-2 Conv1D -> Conv1d -> Conv2d -> head; every adaptable type once."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(32, 16)
        self.lin = nn.Linear(16, 16)
        self.gpt_conv = Conv1D(16, 16)  # weight stored (in, out)
        self.conv1d = nn.Conv1d(16, 16, kernel_size=3, padding=1)
        self.conv2d = nn.Conv2d(4, 4, kernel_size=3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)                                  # (b, t, 16)
        h = torch.relu(self.lin(h))
        h = self.gpt_conv(h)
        h = self.conv1d(h.transpose(1, 2)).transpose(1, 2)  # convolve along t
        b, t, _ = h.shape
        h = self.conv2d(h.reshape(b, t, 4, 4).transpose(1, 2)).transpose(1, 2).reshape(b, t, 16)
        return self.head(h)


LAYER_TARGETS = {
    "Linear": ["lin"],
    "Embedding": ["emb"],
    "Conv1D": ["gpt_conv"],
    "Conv1d": ["conv1d"],
    "Conv2d": ["conv2d"],
}


def mixed_net(dtype: torch.dtype = torch.float32, seed: int = 0) -> MixedNet:
    """A MixedNet with weights fixed by `seed`, cast to `dtype`."""
    torch.manual_seed(seed)
    return MixedNet().to(dtype)


def randomize_adapters(model: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Give every adapter tensor (lora_*) random values so adapters change outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                values = torch.randn(param.shape, generator=generator, device="cpu") * scale  # same values on any device
                param.copy_(values.to(param.dtype))


def param_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """Parameter name -> dtype."""
    return {name: p.dtype for name, p in model.named_parameters()}


def copy_params(source: nn.Module, target: nn.Module) -> None:
    """Copy every parameter of `source` into the same-named parameter of `target`."""
    target_params = dict(target.named_parameters())
    with torch.no_grad():
        for name, param in source.named_parameters():
            target_params[name].copy_(param)


def train_losses(model: nn.Module, ids: torch.Tensor, steps: int = 3, lr: float = 1e-3) -> list[float]:
    """Train `model`'s trainable parameters on causal-LM `ids` for `steps` AdamW steps; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def read_fingerprint(folder) -> dict | None:
    """The precision fingerprint saved in an adapter folder (None when it has none)."""
    from loracast.files.fingerprint import parse_fingerprint
    from loracast.files.folder import read_adapter_folder

    return parse_fingerprint(read_adapter_folder(folder).metadata)
