"""Helpers for the command-line and training tests: a tiny BERT with a real WordPiece tokenizer
saved to a folder (random weights, built from a config, no hub), and rows of loracast's shipped
support-ticket data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from loracast.training.classify.data import default_data_path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def rows_per_label(per_label: int) -> list[dict]:
    """The first `per_label` train and test rows of each label of the shipped dataset."""
    rows = [json.loads(line) for line in default_data_path().read_text(encoding="utf-8").splitlines()]
    out, counts = [], {}
    for row in rows:
        key = (row["label"], row["split"])
        limit = per_label if row["split"] == "train" else max(2, per_label // 4)
        if counts.get(key, 0) < limit:
            counts[key] = counts.get(key, 0) + 1
            out.append(row)
    return out


def save_tiny_bert(folder: Path, texts: list[str], seed: int = 0) -> Path:
    """A 2-layer, 32-wide BertModel and a WordPiece tokenizer whose vocabulary is the words of `texts`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    vocab = {token: i for i, token in enumerate(SPECIAL + words)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(SPECIAL) + len(words), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    BertModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


# Options for short runs on the tiny model (seconds).
TRAIN_FAST = ["--epochs", "3", "--lr", "1e-2", "--batch-size", "16", "--max-length", "32", "--device", "cpu"]
