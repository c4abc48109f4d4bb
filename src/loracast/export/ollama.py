"""An Ollama ``Modelfile`` for a base model and a LoRA-adapter GGUF: ``FROM`` the base, ``ADAPTER``
the file, the chat template as Ollama's Go template, and the system prompt the adapter was trained
with (recorded by `loracast train`).

Ollama's templates are Go templates, not the Jinja of ``tokenizer.chat_template``; the ChatML family
(``<|im_start|>role ... <|im_end|>``: SmolLM2, Qwen) is written out here. For another template the
Modelfile has no TEMPLATE line, and Ollama uses the one it reads from the base's GGUF metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CHATML_GO = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
             '<|im_start|>assistant\n')


def training_system_prompt(adapter: Path) -> str | None:
    """The system prompt `loracast train` recorded beside the adapter (sft.json), if any."""
    try:
        system = json.loads((adapter / "sft.json").read_text(encoding="utf-8")).get("system")
    except (OSError, ValueError, AttributeError):
        return None
    return system if isinstance(system, str) and system else None


def _quoted(text: str) -> str:
    # a Modelfile's triple-quoted value ends at the first """ inside it
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile_text(base: Path, adapter_file: Path, chat_template: str | None, system: str | None) -> str:
    """The Modelfile for `adapter_file` on `base`; paths relative to the Modelfile's folder where
    `base` lies under it, else absolute."""
    folder = adapter_file.resolve().parent
    base_path = base.resolve()
    base_ref = os.path.relpath(base_path, folder) if base_path.is_relative_to(folder) else str(base_path)
    lines = ["# Ollama: ollama create NAME -f Modelfile, then ollama run NAME",
             f"FROM {base_ref if os.path.isabs(base_ref) else './' + base_ref}",
             f"ADAPTER ./{adapter_file.name}"]
    if chat_template and "<|im_start|>" in chat_template and "<|im_end|>" in chat_template:
        lines.append(f"TEMPLATE {_quoted(CHATML_GO)}")
        lines.append('PARAMETER stop "<|im_end|>"')
    else:
        lines.append("# no TEMPLATE: Ollama uses the chat template in the base's GGUF metadata")
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines.append("PARAMETER temperature 0")  # greedy, as loracast generate and the training's evaluations answer
    return "\n".join(lines) + "\n"
