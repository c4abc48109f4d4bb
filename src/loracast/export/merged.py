"""A base model with a LoRA adapter merged into it, written as one GGUF file for llama.cpp and Ollama.

The merge is loracast's exact one: each adapted weight ``W + sum of deltas`` is computed in float64
and rounded once, into the GGUF type asked for (Q8_0: quantized once from the float32 rounding, as
llama.cpp quantizes). From a GGUF base, every tensor the adapter does not touch is copied with its
original bytes (a Q4_1 weight stays the same Q4_1 blocks, no dequantize-requantize), and so is the
metadata (tokenizer, chat template, hyperparameters) as the base's converter wrote it. From a
transformers folder, the file is written as llama.cpp's converter writes a Llama.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loracast._atomic import publish_together
from loracast.config import LoraConfig
from loracast.errors import PrecisionWarning
from loracast.export.encode import TYPES, Encoded, ExportError, check_type, encode
from loracast.export.layout import adapter_factors, base_layout
from loracast.export.llama import (
    add_encoded,
    add_hyperparameters,
    add_model_tensors,
    add_tokenizer,
    gguf_tensor_name,
    to_gguf_layout,
)
from loracast.export.source import check_output, copy_metadata, open_gguf
from loracast.layers.merge import exact_sum
from loracast.training.lm_setup import check_llm_source, is_gguf, load_llm, load_llm_tokenizer
from loracast.tuner.peft_model import PeftModel


@dataclass
class TensorReport:
    """One tensor the adapter changed, as written: its GGUF name and type, and how far the written
    values are from the exact (float64) merged weight, beside how far the adapter moved it."""

    name: str
    ggml_type: str
    max_abs_error: float  # |written - exact merged weight|, largest element
    max_abs_delta: float  # |exact merged weight - base weight|, largest element: the adapter's change


@dataclass
class ExportReport:
    """What `export_merged_gguf` wrote."""

    out: Path
    type: str  # the GGUF type asked for: f32, f16, bf16 or q8_0
    reencoded: list[TensorReport]  # the adapted tensors, merged and rounded once into `type`
    kept: int  # tensors copied from a GGUF base byte for byte
    converted: int  # tensors of a folder base converted to `type` (not touched by the adapter)
    notes: list[str] = field(default_factory=list)  # precision notes from loading the adapter

    @property
    def max_abs_error(self) -> float:
        """The largest error over the re-encoded tensors."""
        return max((t.max_abs_error for t in self.reencoded), default=0.0)


def _check_adapter(adapter: Path) -> None:
    """Raises ExportError for an adapter this export cannot merge into a GGUF file."""
    config = LoraConfig.from_pretrained(adapter)
    if config.task_type != "CAUSAL_LM":
        raise ExportError(f"{adapter} is a {config.task_type} adapter; GGUF export takes a causal LM's (CAUSAL_LM) adapter")
    if config.use_dora:
        raise ExportError(f"{adapter} is a DoRA adapter, which llama.cpp cannot load and loracast export does not merge "
                          "into GGUF; merge it with `loracast merge BASE ADAPTER DIR` and convert DIR with llama.cpp's "
                          "convert_hf_to_gguf.py")
    if config.modules_to_save or getattr(config, "trainable_token_indices", None):
        raise ExportError(f"{adapter} trains whole modules or tokens beside LoRA (modules_to_save / trainable tokens), "
                          "which loracast export does not write; export an adapter with LoRA layers only")


def _load_adapter(base: Path, adapter: Path) -> tuple[Any, PeftModel, list[str]]:
    """The float32 base with the adapter on top, and the precision notes loading it gave."""
    model = load_llm(base, torch.float32, False, torch.device("cpu")).eval()
    with warnings.catch_warnings(record=True) as caught:
        # the adapter was usually trained on a bf16 base: a fingerprint difference is expected, reported
        warnings.simplefilter("always", PrecisionWarning)
        peft_model = PeftModel.from_pretrained(model, adapter)
    notes = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, PrecisionWarning)]
    return model, peft_model, notes


def _merge_layers(peft_model: PeftModel, kind: str, block_count: int, heads: int, kv_heads: int
                  ) -> tuple[dict[str, Encoded], list[TensorReport]]:
    """GGUF name -> the merged, rounded-once tensor of each adapted layer, and its report."""
    encoded: dict[str, Encoded] = {}
    reports: list[TensorReport] = []
    for name, layer in peft_model.base_model.lora_layers():
        weight_name = f"{name}.weight"
        gguf_name = gguf_tensor_name(weight_name, block_count)
        if gguf_name is None or any(layer.lora_bias.get(n) for n in layer.active_adapters):
            raise ExportError(f"the adapter adapts {name}, which a llama.cpp model has no plain weight for "
                              "(or with a LoRA bias); export an adapter of the attention and MLP projections")
        original = layer.get_base_layer().weight.detach()
        # float64: W + B@A*scaling exact to ~1e-16, so the rounding into the file's type is the only one
        exact = exact_sum(original.double(), [layer.get_delta_weight(n) for n in layer.active_adapters])
        change = float((exact - original.double()).abs().max())
        values = exact
        if kind in ("f32", "q8_0"):
            # rounded once to float32 into the loaded weight itself (the model is not used afterwards): the
            # file's f32 tensor is a view of it, so the export holds no second float32 copy of the model
            with torch.no_grad():
                original.copy_(exact)
            values = original
        exact = to_gguf_layout(weight_name, exact, heads, kv_heads)
        tensor = encode(to_gguf_layout(weight_name, values, heads, kv_heads), kind)
        encoded[gguf_name] = tensor
        reports.append(TensorReport(gguf_name, tensor.ggml_type, float((tensor.decoded() - exact).abs().max()), change))
        del exact, values
    return encoded, reports


def export_merged_gguf(adapter_dir: str | Path, base: str | Path, out: str | Path, type: str = "f32", *,
                       overwrite: bool = False) -> ExportReport:
    """Merge the LoRA adapter in `adapter_dir` into `base` and write the result to `out` as one GGUF
    file of type `type` (f32, f16, bf16 or q8_0) that llama.cpp, Ollama and transformers load.

    `base` is a GGUF file (the tensors the adapter does not touch keep their bytes and type, the
    metadata is copied) or a transformers Llama folder (every tensor written in `type`, norms in
    float32). The write is atomic: `out` is complete or absent.

    Raises:
        ExportError: an unsupported architecture or adapter, a type the writer cannot produce, or
            `out` exists and `overwrite` is False.
        AdapterLoadError / ConfigError / FileNotFoundError: the adapter is missing or does not fit `base`.
        ModelFolderError: `base` is not a model folder or a complete GGUF file.
    """
    adapter_dir, out = Path(adapter_dir), Path(out)
    kind = check_type(type)
    check_output(out, overwrite, [Path(base), adapter_dir])
    base = check_llm_source(base)
    _check_adapter(adapter_dir)
    reader = open_gguf(base) if is_gguf(base) else None
    # before loading anything: a base of another architecture, or an adapter of another base, is refused here
    adapter_factors(adapter_dir, base_layout(base, reader))
    model, peft_model, notes = _load_adapter(base, adapter_dir)
    config = model.config
    block_count, heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    encoded, reports = _merge_layers(peft_model, kind, block_count, heads, kv_heads)
    # the model without LoRA layers, for a folder base's other weights (the adapted ones are in `encoded`)
    plain = peft_model.base_model.unload()
    kept = converted = 0

    def write(path: str) -> None:
        nonlocal kept, converted
        import gguf

        writer = gguf.GGUFWriter(path, "llama")
        if reader is not None:
            copy_metadata(reader, writer)
            for tensor in reader.tensors:
                if tensor.name in encoded:
                    add_encoded(writer, tensor.name, encoded[tensor.name].data, encoded[tensor.name].ggml_type)
                else:
                    add_encoded(writer, tensor.name, tensor.data, tensor.tensor_type.name)
                    kept += 1
        else:
            add_hyperparameters(writer, config, base.name, int(gguf.LlamaFileType[TYPES[kind].file_type]))
            add_tokenizer(writer, load_llm_tokenizer(base), config.vocab_size, str(base))
            converted = add_model_tensors(writer, plain, kind, encoded)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    publish_together([(str(out), write)])
    return ExportReport(out=out, type=kind, reencoded=reports, kept=kept, converted=converted, notes=notes)
