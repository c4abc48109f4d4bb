"""Helpers for the SFT tests: a tiny random Llama saved with a byte-level BPE tokenizer trained
here on loracast's triage data (offline, in milliseconds), and two chat templates without
``{% generation %}`` markers (ChatML, as SmolLM2 and Qwen use; Zephyr's <|role|> style)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loracast.training.sft.data import default_chat_data_path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TEMPLATES = {"chatml": (CHATML, "<|im_end|>"), "zephyr": (ZEPHYR, "</s>")}
SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def triage_rows(train: int, test: int) -> list[dict]:
    """The first `train` train rows and `test` test rows of the shipped triage data."""
    rows = [json.loads(line) for line in default_chat_data_path().read_text(encoding="utf-8").splitlines()]
    return ([r for r in rows if r["split"] == "train"][:train] + [r for r in rows if r["split"] == "test"][:test])


def build_tokenizer(template: str = "chatml", texts: list[str] | None = None):
    """A byte-level BPE tokenizer (vocabulary 400) with `template` as its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts or [m["content"] for r in triage_rows(200, 40) for m in r["messages"]]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    chat_template, eos = TEMPLATES[template]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token=eos, pad_token="<pad>")
    tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny_llama(folder: Path, template: str = "chatml", seed: int = 0) -> Path:
    """A 2-layer, 64-wide LlamaForCausalLM (random weights, float32) and its tokenizer in `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(template)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """`rows` as JSON lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# Options for short SFT runs on the tiny model (seconds).
SFT_FAST = ["--max-steps", "4", "--batch-size", "4", "--lr", "5e-3", "--max-new-tokens", "8", "--device", "cpu"]


def run_sft(model: Path, data: Path, out: Path, *options: str) -> Path:
    """`out` after a short `loracast train` (SFT_FAST, then `options`) of `model` on `data`, which must exit 0."""
    from loracast.cli import main

    assert main(["train", "--model", str(model), "--data", str(data), "--out", str(out), *SFT_FAST, *options]) == 0
    return out
