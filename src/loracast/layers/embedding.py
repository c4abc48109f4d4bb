"""LoRA over `nn.Embedding`: a low-rank table added to the looked-up rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loracast.errors import LoracastError
from loracast.layers.base import LoraLayer, delta_dtype
from loracast.layers.init.random_init import init_embedding_pair, rounding_dtype


class Embedding(LoraLayer):
    """``y = base(ids) + (A.T[ids] @ B.T) * scaling``.

    Shapes: lora_embedding_A (r, num_embeddings); lora_embedding_B (embedding_dim, r), as PEFT
    names and shapes them. The looked-up rows are in the adapter dtype; the sum is cast back to
    the base output dtype like every other LoRA layer.
    """

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.in_features = base_layer.num_embeddings
        self.out_features = base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def update_layer(self, adapter_name, r, lora_alpha, *, lora_dropout, init_lora_weights, use_rslora,
                     lora_bias, dtype, device):
        if lora_bias:
            raise LoracastError("lora_bias=True is not supported on an Embedding; remove the embedding from "
                                "target_modules or set lora_bias=False")
        self._register_numbers(adapter_name, r, lora_alpha, use_rslora, lora_bias, lora_dropout)
        weight_a = nn.Parameter(torch.empty((r, self.in_features), dtype=dtype, device=device))
        weight_b = nn.Parameter(torch.empty((self.out_features, r), dtype=dtype, device=device))
        self.lora_embedding_A[adapter_name] = weight_a
        self.lora_embedding_B[adapter_name] = weight_b
        # PEFT's random draws (layers/init/random_init.py)
        init_embedding_pair(weight_a, weight_b, init_lora_weights, rounding_dtype(self.get_base_layer()))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight_a = self.lora_embedding_A[adapter_name]
        weight_b = self.lora_embedding_B[adapter_name]
        dtype = delta_dtype(weight_a)
        return (weight_b.to(dtype) @ weight_a.to(dtype)).T * self.scaling[adapter_name]  # (num_embeddings, dim)

    def low_rank_rows(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``A.T[ids] @ B.T``: the adapter's rows for the ids `x`, before scaling."""
        base = self.base_layer
        rows = F.embedding(x, self.lora_embedding_A[adapter_name].T, padding_idx=base.padding_idx,
                           max_norm=base.max_norm, norm_type=base.norm_type,
                           scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        return rows @ self.lora_embedding_B[adapter_name].T

    def embed_scaled(self, out: torch.Tensor) -> torch.Tensor:
        embed_scale = getattr(self.base_layer, "embed_scale", None)  # Gemma-style scaled embeddings
        if embed_scale is None:
            return out
        return out * (embed_scale.to(out.dtype) if isinstance(embed_scale, torch.Tensor) else embed_scale)

    def lora_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self.embed_scaled(self.low_rank_rows(x, adapter_name) * self.scaling[adapter_name])
