"""Eager attention that recomputes its softmax in backward instead of keeping it: the memory of
the attention probabilities for one extra attention forward per layer.

In training, the plain ("eager") attention of a transformers model keeps, per layer, the float32
softmax output, its copy in the model's dtype, and the keys and values repeated across the query
heads of grouped-query attention: on SmolLM2-135M with 8 x 135 tokens, 273 MB of the step's
1.05 GB of saved activations. ``eager_recompute`` runs the model's own eager attention function
under `torch.utils.checkpoint`: backward keeps only the query, key and value (which the rest of
the layer keeps anyway) and runs the attention forward again. The recomputation repeats the
same operations on the same inputs, so outputs and gradients are bit for bit those of "eager"
(random dropout included: the RNG state is replayed). Outside training, or without gradients,
it is plain eager attention. On a CPU the recomputation costs about a tenth of the step time
(SmolLM2-135M, batches of 8 triage conversations; `benchmarks/sft_step.py`).

`loracast.training.sft.lean_attention` keeps the same tensors without the extra forward, and is
what `loracast train` uses on a CPU; this module serves the eager attentions that one does not
reproduce (soft-capped scores, attention sinks, attention dropout), when asked
(``--attention eager_recompute``).

It is registered with transformers' attention and mask interfaces under `RECOMPUTED_EAGER`
and set on a loaded model with `use_recomputed_eager`; it applies to the models that dispatch
their attention through transformers' attention interface and whose modeling module defines
the usual ``eager_attention_forward`` (Llama, Qwen, Mistral, Gemma and most decoder LMs).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from loracast.training.common.errors import SetupError

RECOMPUTED_EAGER = "eager_recompute"


def _eager_function(module: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    modeling = sys.modules.get(type(module).__module__)
    eager = getattr(modeling, "eager_attention_forward", None)
    if eager is None:
        raise SetupError(f"{type(module).__name__} ({type(module).__module__}) has no eager_attention_forward to "
                         f"recompute; train it with --attention eager")
    return eager


def recomputed_eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The model's eager attention of `module`, recomputed in backward when training (see the
    module docstring); returns (attention output, None): the probabilities are not kept."""
    eager = _eager_function(module)
    if not (module.training and torch.is_grad_enabled()):
        output, _ = eager(module, query, key, value, attention_mask, **kwargs)
        return output, None
    output, _ = checkpoint(eager, module, query, key, value, attention_mask, use_reentrant=False, **kwargs)
    return output, None


def register_recomputed_eager() -> str:
    """Make `RECOMPUTED_EAGER` an attention implementation transformers models load with (eager
    attention's mask, `recomputed_eager_attention`); returns its name. Safe to call again."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(RECOMPUTED_EAGER, recomputed_eager_attention)
    AttentionMaskInterface.register(RECOMPUTED_EAGER, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    return RECOMPUTED_EAGER


def loaded_eager(model: nn.Module) -> bool:
    """Whether `model` is a transformers model loaded with plain eager attention that can switch
    to another implementation."""
    config = getattr(model, "config", None)
    return (config is not None and getattr(model, "set_attn_implementation", None) is not None
            and getattr(config, "_attn_implementation", None) == "eager")


def switch_implementation(model: nn.Module, name: str) -> bool:
    """Set `model`'s attention implementation to the registered `name`; whether it took."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a model without the attention interface says so in a warning: False says it here
    try:
        model.set_attn_implementation(name)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.config._attn_implementation == name


def use_recomputed_eager(model: nn.Module) -> bool:
    """Switch `model` (a transformers model loaded with eager attention) to `RECOMPUTED_EAGER`;
    False, leaving it unchanged, where its attention cannot be recomputed that way."""
    if getattr(sys.modules.get(type(model).__module__), "eager_attention_forward", None) is None:
        return False
    if not loaded_eager(model):
        return False
    return switch_implementation(model, register_recomputed_eager())
