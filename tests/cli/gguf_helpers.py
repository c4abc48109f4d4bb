"""A tiny GGUF causal LM for the tests: a transformers Llama folder converted the way llama.cpp's
``convert_hf_to_gguf.py`` converts one, with the ``gguf`` package's writer.

What the converter does and this helper repeats (each a fact transformers' GGUF loader relies on):
- metadata: ``general.architecture = "llama"`` and the ``llama.*`` hyperparameters (context length,
  embedding length, block count, feed-forward length, head counts, rope dimension = head_dim,
  rope frequency base, RMS-norm epsilon, vocabulary size);
- the tokenizer as a byte-level BPE (``tokenizer.ggml.model = "gpt2"``): the tokens in id order,
  their types (special tokens CONTROL, the rest NORMAL), the merges, the bos/eos/unk/pad ids and
  ``tokenizer.chat_template``;
- tensor names from gguf's own name map (``token_embd``, ``blk.N.attn_q``, ..., ``output_norm``,
  ``output``), 2-D weights stored as F32 or as Q8_0, 1-D norms always F32;
- q and k projection rows permuted from the rotate-half rope layout of transformers to the
  interleaved one of llama.cpp (transformers undoes it on load).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

GGUF_NAME = "tiny.gguf"


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection reordered as llama.cpp's converter writes them: in each head, the
    two rotate-half halves interleaved pair by pair."""
    head_rows = weight.shape[0] // heads
    return (weight.reshape(heads, 2, head_rows // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _token_types(tokenizer, vocab_size: int) -> list[int]:
    """As llama.cpp's converter types them: an added token is CONTROL when special, else USER_DEFINED."""
    import gguf

    added = tokenizer.added_tokens_decoder
    return [int(gguf.TokenType.NORMAL if i not in added else
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            for i in range(vocab_size)]


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([by_id[i] for i in range(vocab_size)])
    writer.add_token_types(_token_types(tokenizer, vocab_size))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def _add_weights(writer, model, quantized: bool) -> None:
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        stem, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{names.get_name(stem)}.{suffix}"
        data = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, config.num_key_value_heads)
        if quantized and data.ndim == 2:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))


def write_gguf(folder: Path, path: Path, quantized: bool = False) -> Path:
    """The Llama model and tokenizer saved in `folder` written as one GGUF file at `path`: weights
    in F32, or with `quantized` the 2-D ones in Q8_0 (dequantized by transformers on load)."""
    import gguf
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(folder.name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantized else gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, tokenizer, config.vocab_size)
    _add_weights(writer, model, quantized)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
