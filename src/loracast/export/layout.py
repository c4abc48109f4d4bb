"""What an export needs to know of a base model before loading it, and whether an adapter fits it:
the layout (block and head counts, each weight's GGUF name and shape) from a GGUF file's metadata or
a transformers folder's config, and the adapter's LoRA factors checked against it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracast.export.encode import ExportError
from loracast.export.llama import check_folder_config, check_gguf_architecture, gguf_tensor_name
from loracast.export.source import open_gguf, read_gguf_field
from loracast.files.format import read_adapter_weights
from loracast.integrations.hf_loading import read_model_config
from loracast.training.sft.model import is_gguf

_FACTOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


@dataclass
class BaseLayout:
    """What the adapter file needs to know of its base: layout numbers and each weight's (out, in)."""

    block_count: int
    heads: int
    kv_heads: int
    shapes: dict[str, tuple[int, int]]  # GGUF tensor name -> (out, in)




@dataclass
class Factors:
    """One adapted linear layer: its transformers module name, the GGUF name of its weight, and
    its LoRA factors A (r, in) and B (out, r)."""

    module: str
    name: str
    a: torch.Tensor
    b: torch.Tensor


def base_layout(base: Path, reader: Any = None) -> BaseLayout:
    """The layout of the Llama at `base` (a GGUF file, read through `reader` when already open, or a
    transformers folder), without loading its weights.

    Raises:
        ExportError: not a Llama-family model.
    """
    if is_gguf(base):
        reader = reader if reader is not None else open_gguf(base)
        check_gguf_architecture(str(read_gguf_field(reader, "general.architecture")), base.name)
        heads = int(read_gguf_field(reader, "llama.attention.head_count"))
        kv_heads = read_gguf_field(reader, "llama.attention.head_count_kv")
        shapes = {t.name: (int(t.shape[1]), int(t.shape[0])) for t in reader.tensors if len(t.shape) == 2}
        return BaseLayout(int(read_gguf_field(reader, "llama.block_count")), heads,
                          int(kv_heads) if kv_heads is not None else heads, shapes)
    from transformers import AutoConfig, AutoModelForCausalLM

    check_folder_config(read_model_config(base), str(base))
    config = AutoConfig.from_pretrained(str(base), local_files_only=True)
    with torch.device("meta"):  # shapes only: no memory, no weights read
        model = AutoModelForCausalLM.from_config(config)
    shapes = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        name = gguf_tensor_name(hf_name, config.num_hidden_layers)
        # a tied head is not a tensor of its own in GGUF (llama.cpp reuses token_embd): nothing to adapt
        if name is not None and tensor.dim() == 2 and not (tied and hf_name == "lm_head.weight"):
            shapes[name] = (int(tensor.shape[0]), int(tensor.shape[1]))
    return BaseLayout(config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, shapes)


def _read_factors(adapter: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> {"A": ..., "B": ...} from the adapter file; anything else in it is refused."""
    tensors, _ = read_adapter_weights(str(adapter))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        found = _FACTOR.match(key)
        if found is None or tensor.dim() != 2:
            raise ExportError(f"{adapter} holds {key!r}, which is not a LoRA factor of a linear layer; a llama.cpp "
                              "adapter holds only those (merge instead: loracast export ADAPTER --base ... --gguf OUT)")
        modules.setdefault(found["module"], {})[found["which"]] = tensor
    incomplete = [m for m, pair in modules.items() if len(pair) != 2]
    if incomplete:
        raise ExportError(f"{adapter} has only one LoRA factor for {incomplete[0]}; save the adapter again")
    return modules




def adapter_factors(adapter: Path, layout: BaseLayout) -> list[Factors]:
    """The LoRA factors of the adapter in `adapter`, sorted by module, each checked against `layout`.

    Raises:
        ExportError: the adapter holds something other than LoRA factors of linear layers, or adapts
            a tensor the base lacks or has another shape (an adapter for another base).
    """
    found = []
    for module, pair in sorted(_read_factors(adapter).items()):
        name = gguf_tensor_name(f"{module}.weight", layout.block_count)
        if name is None or name not in layout.shapes:
            raise ExportError(f"{adapter} adapts {module}, which the base has no tensor for ({name or 'no GGUF name'}); "
                              "pass the base the adapter was trained on")
        a, b = pair["A"], pair["B"]
        if (b.shape[0], a.shape[1]) != layout.shapes[name] or b.shape[1] != a.shape[0]:
            raise ExportError(f"{adapter}: {module} has factors B {tuple(b.shape)} @ A {tuple(a.shape)}, but the base's "
                              f"{name} is {layout.shapes[name]} (out, in); pass the base the adapter was trained on")
        found.append(Factors(module, name, a, b))
    return found
