"""`loracast generate`: answers of a causal LM with a trained adapter (and, to compare, without)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from loracast.cli import CommandError
from loracast.cli.commands._common import add_command, command_errors, dtype_arg, positive_int

EXAMPLES = """\
examples:
  loracast generate --adapter out/train/adapter "My parcel 123456 never came, please hurry!"
  loracast generate --adapter out/train/adapter --compare "I was charged twice for my kettle."
  cat messages.txt | loracast generate --adapter out/train/adapter --model ./my-llama
  loracast generate --model out/tuned.gguf "My parcel 123456 never came."   (a merged export, no adapter)

Each message is sent as one user turn through the tokenizer's chat template, after the system prompt
the adapter was trained with (recorded by `loracast train` in ADAPTER/sft.json; --system replaces it).
Without messages on the command line, each line of stdin is one message. Answers are greedy.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `generate`."""
    parser = add_command(
        subparsers, "generate", "answer messages with a causal LM and a trained adapter",
        "Print the greedy answers of a causal LM with a LoRA adapter (or without one: a merged model) to each message "
        "(chat template applied); --compare also prints the base model's answers.", EXAMPLES)
    parser.add_argument("messages", nargs="*", metavar="MESSAGE", help="messages to answer (default: stdin lines)")
    parser.add_argument("--adapter", type=Path, metavar="DIR",
                        help="the adapter folder (leave out to run --model alone, e.g. a file loracast export wrote)")
    parser.add_argument("--model", type=Path, metavar="DIR|FILE.gguf",
                        help="the base model (default: the one the adapter was trained on, from ADAPTER/sft.json)")
    parser.add_argument("--system", metavar="TEXT", help="system prompt (default: the one used in training)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens per answer (default 64)")
    parser.add_argument("--dtype", type=dtype_arg, metavar="fp32|bf16|fp16", help="base dtype (default bf16)")
    parser.add_argument("--compare", action="store_true", help="also print the base model's answer")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.set_defaults(func=run)
    return parser


def _training_record(adapter: Path) -> dict:
    from loracast.training.sft.run import SFT_NAME

    path = adapter / SFT_NAME
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CommandError(f"{path} is not readable JSON ({exc}); remove it and pass --model and --system") from exc
    return record if isinstance(record, dict) else {}


def run(args: argparse.Namespace) -> int:
    """Load, generate, print."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with command_errors():
        import torch

        from loracast.training.common.runtime import pick_device
        from loracast.training.sft.evaluate import generate_answers
        from loracast.training.sft.model import check_llm_source, default_llm_path, load_llm, load_llm_tokenizer
        from loracast.tuner.peft_model import PeftModel

        if args.adapter is None and (args.model is None or args.compare):
            raise CommandError("--compare and a run without --model need --adapter DIR (the adapter folder); "
                               "without an adapter, pass --model DIR|FILE.gguf")
        if args.adapter is not None and not (args.adapter / "adapter_config.json").is_file():
            raise CommandError(f"--adapter {args.adapter}: no adapter_config.json there; pass the adapter folder "
                               "written by loracast train (OUT/adapter)")
        record = _training_record(args.adapter) if args.adapter is not None else {}
        messages = [m for m in (args.messages or [line.rstrip("\n") for line in sys.stdin]) if m.strip()]
        if not messages:
            raise CommandError("no messages: give them as arguments, or one per line on stdin")
        model_path = args.model or (Path(record["model"]) if record.get("model") else default_llm_path())
        source = check_llm_source(model_path)
        device = pick_device(args.device)
        tokenizer = load_llm_tokenizer(source)
        model = load_llm(source, args.dtype or torch.bfloat16, False, device)
        model = (PeftModel.from_pretrained(model, args.adapter) if args.adapter is not None else model).eval()
        system = args.system if args.system is not None else record.get("system")
        plain = bool(record.get("plain")) or not getattr(tokenizer, "chat_template", None)
        prompts = messages if plain else [
            tokenizer.apply_chat_template(([{"role": "system", "content": system}] if system else [])
                                          + [{"role": "user", "content": m}], tokenize=False,
                                          add_generation_prompt=True) for m in messages]
        flags = [plain] * len(prompts)
        answers = generate_answers(model, tokenizer, prompts, flags, args.max_new_tokens, 16, device)
        base_answers = None
        if args.compare:
            with model.disable_adapter():
                base_answers = generate_answers(model, tokenizer, prompts, flags, args.max_new_tokens, 16, device)
    for index, (message, answer) in enumerate(zip(messages, answers)):
        if len(messages) > 1 or base_answers is not None:
            print(f"message: {message}")
        if base_answers is not None:
            print(f"  base:    {base_answers[index]}")
            print(f"  adapter: {answer}")
        else:
            print(answer if len(messages) == 1 else f"  answer: {answer}")
    return 0
