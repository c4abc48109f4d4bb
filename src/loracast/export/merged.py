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

import numpy as np
import torch

from loracast._atomic import publish_together
from loracast.config import LoraConfig, lora_scaling
from loracast.errors import PrecisionWarning
from loracast.export.encode import TYPES, Encoded, ExportError, check_type, encode, encoded_nbytes, planned_type
from loracast.export.layout import BaseLayout, Factors, adapter_factors, base_layout
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
from loracast.training.sft.model import check_llm_source, is_gguf, load_llm, load_llm_tokenizer
from loracast.tuner.match import pattern_value
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


def _changes_base(config: LoraConfig) -> bool:
    """Whether the adapter's factors belong to a base its initialisation changed (PiSSA, OLoRA, ...):
    loading it through loracast applies that change, a plain W + B@A would not."""
    init = config.init_lora_weights
    return isinstance(init, str) and init.lower() != "gaussian"


def _check_adapter(adapter: Path) -> LoraConfig:
    """The adapter's config; raises ExportError for an adapter this export cannot merge into a GGUF file."""
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
    return config


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


def _merge_gguf_tensor(stored: Any, factor: Factors, config: LoraConfig, kind: str, layout: BaseLayout
                       ) -> tuple[Encoded, TensorReport]:
    """One adapted tensor of a GGUF base, merged: dequantized by gguf's own dequantizer (as
    transformers' loader does), the delta added in llama.cpp's row layout (adding commutes with
    permuting rows), rounded once into `kind`."""
    import gguf

    weight = torch.from_numpy(np.array(gguf.quants.dequantize(stored.data, stored.tensor_type), dtype=np.float32))
    alpha = pattern_value(config.alpha_pattern, factor.module, config.lora_alpha)
    # the layer's delta as loracast computes it: B@A in float64, times PEFT's scaling
    delta = (factor.b.double() @ factor.a.double()) * lora_scaling(factor.a.shape[0], alpha, config.use_rslora)
    delta = to_gguf_layout(f"{factor.module}.weight", delta, layout.heads, layout.kv_heads)
    exact = exact_sum(weight.double(), [delta])
    tensor = encode(exact.float() if kind in ("f32", "q8_0") else exact, kind)
    error = float((tensor.decoded() - exact).abs().max())
    return tensor, TensorReport(factor.name, tensor.ggml_type, error, float(delta.abs().max()))


def _write_from_gguf(path: str, reader: Any, factors: list[Factors], config: LoraConfig, kind: str,
                     layout: BaseLayout, reports: list[TensorReport]) -> int:
    """The merged file at `path`, streamed: the base's metadata and tensors in its order, each adapted
    tensor merged just before it is written (one at a time in memory), the others copied as stored.
    Appends the merged tensors' reports to `reports`; returns how many tensors were copied."""
    import gguf

    adapted = {f.name: f for f in factors}
    writer = gguf.GGUFWriter(path, "llama")
    copy_metadata(reader, writer)
    for stored in reader.tensors:
        if stored.name in adapted:
            shape = (int(stored.shape[1]), int(stored.shape[0]))  # (out, in): GGUF lists the row length first
            ggml_type = planned_type(shape, kind)
            writer.add_tensor_info(stored.name, shape, np.dtype(np.float32), encoded_nbytes(shape, ggml_type),
                                   raw_dtype=gguf.GGMLQuantizationType[ggml_type])
        else:
            writer.add_tensor_info(stored.name, stored.data.shape, stored.data.dtype, stored.data.nbytes,
                                   raw_dtype=stored.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for stored in reader.tensors:
        if stored.name in adapted:
            tensor, report = _merge_gguf_tensor(stored, adapted[stored.name], config, kind, layout)
            reports.append(report)
            writer.write_tensor_data(tensor.data)
        else:
            writer.write_tensor_data(stored.data)
    writer.close()
    return len(reader.tensors) - len(adapted)


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
    config = _check_adapter(adapter_dir)
    reader = open_gguf(base) if is_gguf(base) else None
    # before loading anything: a base of another architecture, or an adapter of another base, is refused here
    layout = base_layout(base, reader)
    factors = adapter_factors(adapter_dir, layout)
    if reader is not None and not _changes_base(config):
        reports: list[TensorReport] = []
        kept = 0

        def write_streamed(path: str) -> None:
            nonlocal kept
            kept = _write_from_gguf(path, reader, factors, config, kind, layout, reports)

        publish_together([(str(out), write_streamed)])
        return ExportReport(out=out, type=kind, reencoded=reports, kept=kept, converted=0)
    # the adapter model itself: a folder base, or factors that belong to a changed base (PiSSA, ...)
    model, peft_model, notes = _load_adapter(base, adapter_dir)
    model_config = model.config
    encoded, reports = _merge_layers(peft_model, kind, model_config.num_hidden_layers,
                                     model_config.num_attention_heads, model_config.num_key_value_heads)
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
            add_hyperparameters(writer, plain.config, base.name, int(gguf.LlamaFileType[TYPES[kind].file_type]))
            add_tokenizer(writer, load_llm_tokenizer(base), plain.config.vocab_size, str(base))
            converted = add_model_tensors(writer, plain, kind, encoded)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    publish_together([(str(out), write)])
    return ExportReport(out=out, type=kind, reencoded=reports, kept=kept, converted=converted, notes=notes)
