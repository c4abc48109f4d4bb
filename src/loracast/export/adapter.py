"""A LoRA adapter alone as a llama.cpp LoRA-adapter GGUF file (what `llama-server --lora` and
Ollama's ``ADAPTER`` line load), with an Ollama Modelfile beside it.

The file, as llama.cpp's ``convert_lora_to_gguf.py`` writes one: ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha``, and for each adapted base tensor ``NAME`` (its
GGUF name, e.g. ``blk.0.attn_q.weight``) the factors ``NAME.lora_a`` (r, in) and ``NAME.lora_b``
(out, r); the q/k rows of ``lora_b`` permuted as the base's rows are. llama.cpp scales ``B @ A`` by
alpha / r (r: that tensor's rank): where PEFT's scaling differs (rank-stabilised LoRA, per-module
alpha), the ratio is folded into ``lora_b`` in float64 before its one rounding.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracast._atomic import publish_together, write_text
from loracast.config import LoraConfig, lora_scaling
from loracast.export.encode import Encoded, ExportError, check_type, encode
from loracast.export.llama import add_encoded, check_folder_config, check_gguf_architecture, gguf_tensor_name, rope_heads
from loracast.export.llama import interleave_rope_rows as permute_rows
from loracast.export.ollama import modelfile_text, training_system_prompt
from loracast.export.source import check_output, open_gguf, read_gguf_field
from loracast.files.format import read_adapter_weights
from loracast.integrations.hf_loading import read_model_config
from loracast.training.lm_setup import check_llm_source, is_gguf, load_llm_tokenizer
from loracast.tuner.inject import pattern_value

ADAPTER_TYPES = ("f32", "f16", "bf16")  # llama.cpp multiplies the factors as they are; Q8_0 would round rank-16 rows
_FACTOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_FROM_BASE_INITS = ("pissa", "olora", "loftq", "corda")  # their factors belong to a changed base: cannot stand alone


@dataclass
class AdapterExportReport:
    """What `export_adapter_gguf` wrote."""

    out: Path
    modelfile: Path | None
    base: Path
    types: list[str]  # the GGML types of the factors written
    tensors: int  # adapted base tensors (each written as lora_a and lora_b)
    alpha: float
    folded: int  # tensors whose lora_b carries the ratio of PEFT's scaling to llama.cpp's alpha / r


@dataclass
class _BaseShape:
    """What the adapter file needs to know of its base: layout numbers and each weight's (out, in)."""

    block_count: int
    heads: int
    kv_heads: int
    shapes: dict[str, tuple[int, int]]  # GGUF tensor name -> (out, in)
    chat_template: str | None


def default_base(adapter: Path) -> Path:
    """The base an adapter was trained on, as its files record it (a local path).

    Raises:
        ExportError: neither the adapter config nor loracast train's sft.json names a local base.
    """
    candidates = []
    sft = adapter / "sft.json"
    if sft.is_file():
        try:
            candidates.append(json.loads(sft.read_text(encoding="utf-8")).get("model"))
        except (OSError, ValueError, AttributeError):
            pass  # the adapter config may still name it
    candidates.append(LoraConfig.from_pretrained(adapter).base_model_name_or_path)
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise ExportError(f"{adapter} does not name a base model file or folder that exists here; pass --base MODEL(.gguf|DIR)")


def _base_shape(base: Path) -> _BaseShape:
    if is_gguf(base):
        reader = open_gguf(base)
        check_gguf_architecture(str(read_gguf_field(reader, "general.architecture")), base.name)
        heads = int(read_gguf_field(reader, "llama.attention.head_count"))
        kv_heads = read_gguf_field(reader, "llama.attention.head_count_kv")
        shapes = {t.name: (int(t.shape[1]), int(t.shape[0])) for t in reader.tensors if len(t.shape) == 2}
        return _BaseShape(int(read_gguf_field(reader, "llama.block_count")), heads,
                          int(kv_heads) if kv_heads is not None else heads, shapes,
                          read_gguf_field(reader, "tokenizer.chat_template"))
    from transformers import AutoConfig, AutoModelForCausalLM

    check_folder_config(read_model_config(base), str(base))
    config = AutoConfig.from_pretrained(str(base), local_files_only=True)
    with torch.device("meta"):  # shapes only: no memory, no weights read
        model = AutoModelForCausalLM.from_config(config)
    shapes = {}
    for hf_name, tensor in model.state_dict().items():
        name = gguf_tensor_name(hf_name, config.num_hidden_layers)
        if name is not None and tensor.dim() == 2:
            shapes[name] = (int(tensor.shape[0]), int(tensor.shape[1]))
    try:
        template = getattr(load_llm_tokenizer(base), "chat_template", None)
    except ValueError:  # no tokenizer in the folder: the Modelfile goes without a template
        template = None
    return _BaseShape(config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, shapes, template)


def _factors(adapter: Path, config: LoraConfig) -> dict[str, dict[str, torch.Tensor]]:
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


def _check_config(adapter: Path, config: LoraConfig) -> None:
    init = config.init_lora_weights
    problems = [
        (config.task_type not in (None, "CAUSAL_LM"), f"a {config.task_type} adapter (a causal LM's is needed)"),
        (config.use_dora, "a DoRA adapter (llama.cpp has no DoRA)"),
        (bool(config.modules_to_save), "modules_to_save (whole trained modules)"),
        (config.lora_bias, "LoRA biases"),
        (isinstance(init, str) and init.lower().startswith(_FROM_BASE_INITS), f"init_lora_weights={init!r} (it changes "
                                                                              "the base weights too)"),
    ]
    for bad, what in problems:
        if bad:
            raise ExportError(f"{adapter} has {what}, which a llama.cpp LoRA adapter cannot hold; export the merged model "
                              "instead: loracast export ADAPTER --base MODEL --gguf OUT.gguf")


def _encoded_factors(adapter: Path, config: LoraConfig, base: _BaseShape, kind: str | None
                     ) -> tuple[list[tuple[str, Encoded]], int]:
    out: list[tuple[str, Encoded]] = []
    folded = 0
    for module, pair in sorted(_factors(adapter, config).items()):
        name = gguf_tensor_name(f"{module}.weight", base.block_count)
        if name is None or name not in base.shapes:
            raise ExportError(f"{adapter} adapts {module}, which the base has no tensor for ({name or 'no GGUF name'}); "
                              "pass the base the adapter was trained on")
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        if (b.shape[0], a.shape[1]) != base.shapes[name] or b.shape[1] != rank:
            raise ExportError(f"{adapter}: {module} has factors B {tuple(b.shape)} @ A {tuple(a.shape)}, but the base's "
                              f"{name} is {base.shapes[name]} (out, in); pass the base the adapter was trained on")
        own = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}.get(a.dtype, "f32")
        target = kind or own
        alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha)
        ratio = lora_scaling(rank, alpha, config.use_rslora) / (config.lora_alpha / rank)
        b = b.double()
        if not math.isclose(ratio, 1.0, rel_tol=0, abs_tol=0):
            b = b * ratio
            folded += 1
        heads = rope_heads(f"{module}.weight", base.heads, base.kv_heads)
        if heads is not None:
            b = permute_rows(b, heads)
        out.append((f"{name}.lora_a", encode(a.double(), target)))
        out.append((f"{name}.lora_b", encode(b, target)))
    return out, folded


def export_adapter_gguf(adapter_dir: str | Path, out: str | Path, base: str | Path | None = None,
                        type: str | None = None, *, overwrite: bool = False, modelfile: bool = True
                        ) -> AdapterExportReport:
    """Write the LoRA adapter in `adapter_dir` as a llama.cpp LoRA-adapter GGUF file `out`, with its
    factors in `type` (f32, f16 or bf16; default: the adapter's own dtype), and with `modelfile` an
    Ollama ``Modelfile`` beside it (FROM the base, ADAPTER the file, the chat template).

    `base` (a GGUF file or a transformers Llama folder; default: the one the adapter records) is read
    for its layout only: names, shapes, head counts. Both files are written atomically, together.

    Raises:
        ExportError: an adapter llama.cpp cannot hold, an adapter for another base, an unsupported
            architecture or type, or an output that exists and `overwrite` is False.
        FileNotFoundError / AdapterLoadError / ConfigError: the adapter folder is missing or unreadable.
    """
    adapter_dir, out = Path(adapter_dir), Path(out)
    kind = check_type(type, ADAPTER_TYPES) if type is not None else None
    config = LoraConfig.from_pretrained(adapter_dir)
    _check_config(adapter_dir, config)
    base = check_llm_source(base) if base is not None else check_llm_source(default_base(adapter_dir))
    modelfile_path = out.parent / "Modelfile" if modelfile else None
    check_output(out, overwrite, [base, adapter_dir])
    if modelfile_path is not None:
        check_output(modelfile_path, overwrite, [base, adapter_dir])
    shape = _base_shape(base)
    tensors, folded = _encoded_factors(adapter_dir, config, shape, kind)

    def write(path: str) -> None:
        import gguf

        writer = gguf.GGUFWriter(path, "llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.lora_alpha))
        writer.add_name(adapter_dir.resolve().name)
        for name, tensor in tensors:
            add_encoded(writer, name, tensor.data, tensor.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    files: list[tuple[str, Any]] = [(str(out), write)]
    if modelfile_path is not None:
        text = modelfile_text(base, out, shape.chat_template, training_system_prompt(adapter_dir))
        files.append((str(modelfile_path), lambda tmp: write_text(tmp, text)))
    publish_together(files)
    return AdapterExportReport(out=out, modelfile=modelfile_path, base=base, types=sorted({t.ggml_type for _, t in tensors}),
                               tensors=len(tensors) // 2, alpha=float(config.lora_alpha), folded=folded)
