"""Exporting fine-tuned models to where they run: GGUF files for llama.cpp and Ollama.

- `export_merged_gguf`: the base with the adapter merged once (float64, rounded once into the
  type asked for), as one GGUF file; from a GGUF base the untouched tensors keep their bytes;
- `export_adapter_gguf`: the adapter alone as a llama.cpp LoRA-adapter GGUF, and an Ollama
  Modelfile beside it.

Llama-family models only (`SUPPORTED`); the `gguf` package does the file format.
"""

from loracast.export.adapter import AdapterExportReport, default_base, export_adapter_gguf
from loracast.export.encode import TYPES, ExportError
from loracast.export.llama import SUPPORTED
from loracast.export.merged import ExportReport, TensorReport, export_merged_gguf

__all__ = ["SUPPORTED", "TYPES", "AdapterExportReport", "ExportError", "ExportReport", "TensorReport",
           "default_base", "export_adapter_gguf", "export_merged_gguf"]
