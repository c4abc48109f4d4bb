"""A tiny GGUF causal LM for the tests: a transformers Llama folder converted the way llama.cpp's
``convert_hf_to_gguf.py`` converts one, by loracast's GGUF writer (``loracast.export.llama``).

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

from pathlib import Path

import torch

GGUF_NAME = "tiny.gguf"


def write_gguf(folder: Path, path: Path, quantized: bool = False) -> Path:
    """The Llama model and tokenizer saved in `folder` written as one GGUF file at `path`: weights
    in F32, or with `quantized` the 2-D ones in Q8_0 (dequantized by transformers on load).

    The writing is loracast's own (`loracast.export.llama`, which `loracast export` uses for a
    folder base); these tests check it against transformers' GGUF reader."""
    import gguf
    from transformers import AutoTokenizer, LlamaForCausalLM

    from loracast.export.llama import add_hyperparameters, add_model_tensors, add_tokenizer

    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    writer = gguf.GGUFWriter(str(path), "llama")
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quantized else gguf.LlamaFileType.ALL_F32
    add_hyperparameters(writer, model.config, folder.name, int(file_type))
    add_tokenizer(writer, tokenizer, model.config.vocab_size, str(folder))
    add_model_tensors(writer, model, "q8_0" if quantized else "f32", {})
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
