"""Shared fixtures: small transformers models built from configs (random weights, no hub)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

# bitsandbytes logs a missing optional 'kernels' package on import; it is not needed on the CPU.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def tiny_llama_config(**overrides):
    """A 2-layer Llama small enough to build in milliseconds."""
    from transformers import LlamaConfig

    values = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture
def make_llama():
    """Factory: the same randomly initialised tiny Llama each call, in the requested dtype."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_llama_config())
    state = {k: v.clone() for k, v in reference.state_dict().items()}

    def build(dtype: torch.dtype = torch.float32):
        model = LlamaForCausalLM(tiny_llama_config())
        model.load_state_dict(state)
        return model.to(dtype).eval()

    return build
