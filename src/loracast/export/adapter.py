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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracast._atomic import publish_together, write_text
from loracast.config import LoraConfig, lora_scaling
from loracast.export.encode import Encoded, ExportError, check_type, encode
from loracast.export.layout import BaseLayout, Factors, adapter_factors, base_layout
from loracast.export.llama import add_encoded, interleave_rope_rows, rope_heads
from loracast.export.ollama import modelfile_text, training_system_prompt
from loracast.export.source import check_output, open_gguf, read_gguf_field
from loracast.training.sft.model import check_llm_source, is_gguf, load_llm_tokenizer
from loracast.tuner.match import pattern_value

ADAPTER_TYPES = ("f32", "f16", "bf16")  # llama.cpp multiplies the factors as they are; Q8_0 would round rank-16 rows
_OWN_TYPE = {torch.float16: "f16", torch.bfloat16: "bf16"}  # a half-precision adapter stays so; others: f32
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


def _chat_template(base: Path) -> str | None:
    """The base's chat template (Jinja), None when it has none."""
    if is_gguf(base):
        return read_gguf_field(open_gguf(base), "tokenizer.chat_template")
    try:
        return getattr(load_llm_tokenizer(base), "chat_template", None)
    except ValueError:  # no tokenizer in the folder: the Modelfile goes without a template
        return None


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


def _encoded_factors(factors: list[Factors], config: LoraConfig, layout: BaseLayout, kind: str | None
                     ) -> tuple[list[tuple[str, Encoded]], int]:
    """(GGUF name, tensor) of every lora_a and lora_b to write, and how many lora_b carry a folded ratio."""
    out: list[tuple[str, Encoded]] = []
    folded = 0
    for factor in factors:
        rank = factor.a.shape[0]
        target = kind or _OWN_TYPE.get(factor.a.dtype, "f32")
        alpha = pattern_value(config.alpha_pattern, factor.module, config.lora_alpha)
        ratio = lora_scaling(rank, alpha, config.use_rslora) / (config.lora_alpha / rank)
        b = factor.b.double()
        if ratio != 1.0:  # llama.cpp scales by alpha / r; PEFT's own scaling differs by this factor
            b = b * ratio
            folded += 1
        heads = rope_heads(f"{factor.module}.weight", layout.heads, layout.kv_heads)
        if heads is not None:  # B's rows are the weight's rows: permuted as llama.cpp stores q and k
            b = interleave_rope_rows(b, heads)
        out.append((f"{factor.name}.lora_a", encode(factor.a.double(), target)))
        out.append((f"{factor.name}.lora_b", encode(b, target)))
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
    layout = base_layout(base)
    tensors, folded = _encoded_factors(adapter_factors(adapter_dir, layout), config, layout, kind)

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
        text = modelfile_text(base, out, _chat_template(base), training_system_prompt(adapter_dir))
        files.append((str(modelfile_path), lambda tmp: write_text(tmp, text)))
    publish_together(files)
    return AdapterExportReport(out=out, modelfile=modelfile_path, base=base, types=sorted({t.ggml_type for _, t in tensors}),
                               tensors=len(tensors) // 2, alpha=float(config.lora_alpha), folded=folded)
