"""The models and inputs the benchmark uses, built from configs (random weights, no hub).

`SIZES["full"]` is the issue's reference: a Llama of hidden 512, 8 layers, vocab 32000
(58 M parameters, 25.3 M of them in the 56 adapted linear layers), batch 4 x 256 tokens,
LoRA r=16 on every linear layer. `SIZES["quick"]` is a seconds-long smoke version of every
case, used by the tests.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Size:
    """Shapes of one benchmark run."""

    hidden: int            # reference Llama (training, inference, merge, 4-bit)
    intermediate: int
    layers: int
    heads: int
    vocab: int
    batch: int             # training batch x tokens
    seq: int
    infer_seq: int         # inference: one sequence of this many tokens
    deep_layers: int       # injection / save-load model: a narrow Llama this deep (7 targets per layer)
    meta_hidden: int       # the model built on the meta device (7B: 4096 / 11008 / 32 layers)
    meta_intermediate: int
    meta_layers: int
    rank: int = 16
    alpha: int = 32


SIZES = {
    "full": Size(hidden=512, intermediate=1376, layers=8, heads=8, vocab=32000, batch=4, seq=256, infer_seq=256,
                 deep_layers=48, meta_hidden=4096, meta_intermediate=11008, meta_layers=32),
    "quick": Size(hidden=64, intermediate=128, layers=2, heads=4, vocab=512, batch=2, seq=32, infer_seq=32,
                  deep_layers=4, meta_hidden=256, meta_intermediate=512, meta_layers=2),
}


def llama_config(size: Size):
    """The reference Llama's config."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
                       num_attention_heads=size.heads, num_key_value_heads=size.heads, vocab_size=size.vocab,
                       max_position_embeddings=max(size.seq, size.infer_seq), tie_word_embeddings=False)


def build_llama(size: Size, dtype: torch.dtype, seed: int = 0):
    """The reference Llama in `dtype`, the same weights for the same seed."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(size)).to(dtype)


def deep_template(size: Size):
    """A narrow, deep Llama (hidden 64): injection and save/load cost is per module, not per weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=size.deep_layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=256, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def fresh_copy(template):
    """An independent copy of a template model."""
    return copy.deepcopy(template)


def meta_llama(size: Size):
    """A 7B-shaped Llama with every tensor on the meta device (no memory, no init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=size.meta_hidden, intermediate_size=size.meta_intermediate,
                         num_hidden_layers=size.meta_layers, num_attention_heads=32, num_key_value_heads=32,
                         vocab_size=32000)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def token_ids(size: Size, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    """Random token ids of shape (batch, seq)."""
    return torch.randint(0, size.vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
