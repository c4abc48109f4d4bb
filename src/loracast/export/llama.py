"""What llama.cpp expects of a Llama-family GGUF file, as its converter (`convert_hf_to_gguf.py`)
writes one: tensor names, the q/k row layout, the hyperparameters and the tokenizer metadata.

- names from gguf's own name map (``token_embd``, ``blk.N.attn_q``, ..., ``output_norm``,
  ``output``); a tied output head is not written (llama.cpp reuses ``token_embd``);
- q and k projection rows permuted from transformers' rotate-half rope layout to llama.cpp's
  interleaved one (transformers' GGUF loader undoes it);
- ``llama.*`` hyperparameters, and the tokenizer as a byte-level BPE (``tokenizer.ggml.model =
  "gpt2"``): tokens in id order, their types, merges, special token ids, ``tokenizer.chat_template``.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import torch

from loracast.export.encode import Encoded, ExportError, encode

GGUF_ARCHITECTURE = "llama"
FOLDER_ARCHITECTURES = ("LlamaForCausalLM",)  # transformers classes whose folders export as GGUF "llama"
SUPPORTED = "Llama-family models (GGUF architecture 'llama': SmolLM2, Llama 2, Llama 3 without rope scaling)"


def check_gguf_architecture(architecture: str, source: str) -> None:
    """Raises ExportError unless a GGUF file's ``general.architecture`` is one loracast exports."""
    if architecture != GGUF_ARCHITECTURE:
        raise ExportError(f"{source} is a {architecture!r} model; loracast export supports {SUPPORTED} only")


def check_folder_config(config: dict[str, Any], source: str) -> None:
    """Raises ExportError unless a transformers ``config.json`` (as a dict) describes a Llama
    loracast can write as GGUF."""
    architectures = list(config.get("architectures") or [])
    if not any(a in FOLDER_ARCHITECTURES for a in architectures):
        raise ExportError(f"{source} holds {', '.join(architectures) or 'an unnamed model'}; loracast export supports "
                          f"{SUPPORTED} only")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"{source} uses {rope['rope_type']!r} rope scaling, which loracast's GGUF writer does not "
                          "write; export from a GGUF file of the base instead (--base FILE.gguf)")


@functools.lru_cache(maxsize=4)
def _name_map(block_count: int) -> Any:
    # gguf builds the map from hundreds of patterns per block: about 0.1 s, once per model size
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, block_count)


def gguf_tensor_name(hf_name: str, block_count: int) -> str | None:
    """The GGUF name of a transformers Llama parameter (``model.layers.0.self_attn.q_proj.weight`` ->
    ``blk.0.attn_q.weight``); None for a name llama.cpp has no tensor for."""
    names = _name_map(block_count)
    stem, _, suffix = hf_name.rpartition(".")
    mapped = names.get_name(stem)
    return f"{mapped}.{suffix}" if mapped else None


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection (out, in) reordered as llama.cpp stores them: within each head the
    two rotate-half halves interleaved pair by pair."""
    head_rows = weight.shape[0] // heads
    return weight.reshape(heads, 2, head_rows // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def rope_heads(hf_name: str, heads: int, kv_heads: int) -> int | None:
    """How many heads the rows of `hf_name` are permuted over (q: attention heads, k: kv heads), or None."""
    if hf_name.endswith("q_proj.weight"):
        return heads
    if hf_name.endswith("k_proj.weight"):
        return kv_heads
    return None


def to_gguf_layout(hf_name: str, weight: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """`weight` in the row order llama.cpp stores `hf_name` in (q/k permuted, others unchanged)."""
    count = rope_heads(hf_name, heads, kv_heads)
    return weight if count is None else interleave_rope_rows(weight, count)


def _token_types(tokenizer: Any, vocab_size: int) -> list[int]:
    """As llama.cpp's converter types them: an added token is CONTROL when special, else USER_DEFINED."""
    import gguf

    added = tokenizer.added_tokens_decoder
    return [int(gguf.TokenType.NORMAL if i not in added else
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            for i in range(vocab_size)]


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, source: str) -> None:
    """The byte-level BPE `tokenizer` (a transformers fast tokenizer) as GGUF tokenizer metadata.

    Raises:
        ExportError: the tokenizer is not a byte-level BPE, or has fewer tokens than the vocabulary.
    """
    backend_tokenizer = getattr(tokenizer, "backend_tokenizer", None)
    backend = json.loads(backend_tokenizer.to_str()) if backend_tokenizer is not None else {}
    if backend.get("model", {}).get("type") != "BPE" or "merges" not in backend["model"]:
        raise ExportError(f"the tokenizer of {source} is not a byte-level BPE (as SmolLM2's and Llama 3's are); "
                          "export from a GGUF file of the base instead (--base FILE.gguf)")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    missing = [i for i in range(vocab_size) if i not in by_id]
    if missing:
        raise ExportError(f"the tokenizer of {source} has no token for {len(missing)} of the model's {vocab_size} ids "
                          f"(first: {missing[0]}); export from a GGUF file of the base instead (--base FILE.gguf)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([by_id[i] for i in range(vocab_size)])
    writer.add_token_types(_token_types(tokenizer, vocab_size))
    writer.add_token_merges(merges)
    for setter, value in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if value is not None:
            setter(value)
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def add_hyperparameters(writer: Any, config: Any, name: str, file_type: int) -> None:
    """The ``general.*`` and ``llama.*`` metadata of a transformers Llama `config`."""
    import gguf

    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def add_encoded(writer: Any, name: str, data: np.ndarray, ggml_type: str) -> None:
    """One tensor for `writer`: `data` as `encode` or a GGUF reader gives it, of GGML type `ggml_type`."""
    import gguf

    qtype = gguf.GGMLQuantizationType[ggml_type]
    writer.add_tensor(name, data, raw_dtype=qtype if data.dtype not in (np.float32, np.float16) else None)


def add_model_tensors(writer: Any, model: torch.nn.Module, kind: str, replaced: dict[str, Encoded]) -> int:
    """Every weight of the transformers Llama `model` onto `writer` under its GGUF name, in llama.cpp's
    layout and rounded once into GGUF type `kind` (norms in float32), except those in `replaced`
    (GGUF name -> tensor ready to write), which are written as given. Returns how many were converted."""
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    converted = 0
    for hf_name, tensor in model.state_dict().items():
        name = gguf_tensor_name(hf_name, config.num_hidden_layers)
        if name is None or (tied and hf_name == "lm_head.weight"):
            continue  # rotary caches have no tensor; a tied head is token_embd itself
        if name not in replaced:
            values = to_gguf_layout(hf_name, tensor.detach(), config.num_attention_heads, config.num_key_value_heads)
            done = encode(values, kind)
            converted += 1
        else:
            done = replaced[name]
        add_encoded(writer, name, done.data, done.ggml_type)
    return converted
