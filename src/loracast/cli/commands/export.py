"""`loracast export`: a fine-tuned model as GGUF for llama.cpp and Ollama, merged or as an adapter."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from loracast.cli import CommandError
from loracast.cli.commands._common import add_command, command_errors

EXAMPLES = """\
examples:
  loracast export out/demo/adapter --base SmolLM2-135M-Instruct.Q4_1.gguf --gguf out/smollm2-tuned.gguf
  loracast export out/demo/adapter --base SmolLM2-135M-Instruct.Q4_1.gguf --gguf out/tuned-q8.gguf --type q8_0
  loracast export out/demo/adapter --gguf-adapter out/ollama/adapter.gguf

--gguf writes the base with the adapter merged (each adapted weight W + B@A*scaling computed in float64
and rounded once into --type); from a GGUF base the tensors the adapter does not touch keep their bytes.
--gguf-adapter writes the adapter alone as a llama.cpp LoRA adapter (llama-server --lora FILE) and an
Ollama Modelfile beside it (ollama create NAME -f Modelfile). Llama-family models (SmolLM2, Llama).
Run the merged file with: loracast generate --model OUT.gguf "message"
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `export`."""
    parser = add_command(
        subparsers, "export", "write a fine-tuned model as GGUF (merged, or a llama.cpp LoRA adapter)",
        "Write the base model with a LoRA adapter merged once as a GGUF file for llama.cpp and Ollama, or the adapter "
        "alone as a llama.cpp LoRA-adapter GGUF with an Ollama Modelfile.", EXAMPLES)
    parser.add_argument("adapter", type=Path, metavar="ADAPTER", help="the adapter folder (adapter_config.json + weights)")
    parser.add_argument("--base", type=Path, metavar="MODEL(.gguf|DIR)",
                        help="the base model (default: the one the adapter records, if it exists here)")
    parser.add_argument("--gguf", type=Path, metavar="OUT.gguf", help="write the merged model to this GGUF file")
    parser.add_argument("--type", default=None, metavar="f32|f16|bf16|q8_0",
                        help="GGUF type of the written weights (merged default f32; adapter default: its own dtype)")
    parser.add_argument("--gguf-adapter", type=Path, metavar="OUT.gguf",
                        help="write the adapter alone as a llama.cpp LoRA adapter, and a Modelfile beside it")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that exist")
    parser.set_defaults(func=run)
    return parser


def _print_merged(report) -> None:
    print(f"merged model written to {report.out} ({report.type}; {len(report.reencoded)} tensors merged and rounded "
          f"once, {report.kept} kept byte for byte from the base, {report.converted} converted from the base)")
    for note in report.notes:
        print(f"note: {note}")
    for tensor in report.reencoded:
        print(f"  {tensor.name:<28} {tensor.ggml_type:<5} max |error| {tensor.max_abs_error:.3g}  "
              f"(adapter's change: max {tensor.max_abs_delta:.3g})")


def run(args: argparse.Namespace) -> int:
    """Export, print what was written."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if (args.gguf is None) == (args.gguf_adapter is None):
        raise CommandError("give one of --gguf OUT.gguf (the merged model) or --gguf-adapter OUT.gguf (the adapter alone)")
    with command_errors():
        from loracast.export import default_base, export_adapter_gguf, export_merged_gguf

        if not (args.adapter / "adapter_config.json").is_file():
            raise CommandError(f"{args.adapter}: no adapter_config.json there; pass the adapter folder "
                               "(loracast train writes OUT/adapter)")
        if args.gguf is not None:
            base = args.base if args.base is not None else default_base(args.adapter)
            report = export_merged_gguf(args.adapter, base, args.gguf, args.type or "f32", overwrite=args.overwrite)
        else:
            adapter_report = export_adapter_gguf(args.adapter, args.gguf_adapter, args.base, args.type,
                                                 overwrite=args.overwrite)
    if args.gguf is not None:
        _print_merged(report)
        return 0
    print(f"LoRA adapter written to {adapter_report.out} ({', '.join(adapter_report.types)}; {adapter_report.tensors} "
          f"tensors, alpha {adapter_report.alpha:g}" + (f", scaling folded into lora_b of {adapter_report.folded}"
                                                        if adapter_report.folded else "") + ")")
    if adapter_report.modelfile is not None:
        print(f"Ollama Modelfile written to {adapter_report.modelfile} (FROM {adapter_report.base})")
    return 0
