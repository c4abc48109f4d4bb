"""Evaluating a causal LM on held-out conversations: greedy answers, their exact score, and the
loss on the assistant's tokens.

Scoring is exact. When the references are JSON objects (the shipped triage task), an answer
counts as valid when the whole answer parses as one JSON object, as correct when it equals the
reference object, and each field of the reference is scored on its own. Otherwise an answer is
correct when it equals the reference text (surrounding whitespace aside).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loracast.training.sft.batches import left_padded
from loracast.training.sft.data import ChatExample
from loracast.training.sft.loss import output_head
from loracast.training.sft.template import prompt_text


@dataclass
class Score:
    """The exact score of a list of answers."""

    exact: float  # share of answers equal to the reference
    valid_json: float | None = None  # share of whole answers that are one JSON object (JSON tasks only)
    fields: dict[str, float] = field(default_factory=dict)  # per-field accuracy (JSON tasks only)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"exact": self.exact, "valid_json": self.valid_json, "fields": dict(self.fields)}


def _as_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def score_answers(answers: Sequence[str], references: Sequence[str]) -> Score:
    """The exact score of `answers` against `references` (see the module's rule)."""
    if not references:
        return Score(exact=math.nan)
    expected = [_as_object(r) for r in references]
    if any(e is None for e in expected):
        exact = sum(a.strip() == r.strip() for a, r in zip(answers, references)) / len(references)
        return Score(exact=exact)
    parsed = [_as_object(a) for a in answers]
    keys = sorted({k for e in expected for k in e})
    fields = {k: sum(p is not None and k in e and p.get(k, object()) == e[k] for p, e in zip(parsed, expected))
              / sum(k in e for e in expected) for k in keys}
    return Score(exact=sum(p == e for p, e in zip(parsed, expected)) / len(expected),
                 valid_json=sum(p is not None for p in parsed) / len(parsed), fields=fields)


def stop_token_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    """Tokens that end an answer: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in (configured if isinstance(configured, (list, tuple)) else [configured]))
    return sorted(ids)


def _contiguous_first_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


@contextlib.contextmanager
def contiguous_head_input(model: nn.Module) -> Iterator[None]:
    """Inside the block, the model's output head receives contiguous hidden states.

    Generation projects only the last position, which transformers slices out of the hidden
    states as a strided view. On the CPU, torch 2.13's linear with a frozen (requires_grad=False)
    bf16 weight and a strided 3-D input is pathologically slow: measured for SmolLM2's head
    (49,152 x 576) and 32 prompts of 90 tokens, 1.6 s and 1.7 GB of transient memory instead of
    8 ms, at every prefill. A contiguous copy of that one position avoids it.
    """
    head = output_head(model)
    handle = head.register_forward_pre_hook(_contiguous_first_input) if head is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer: Any, prompts: Sequence[str], plain: Sequence[bool],
                     max_new_tokens: int, batch_size: int, device: torch.device, synced: bool = False) -> list[str]:
    """Greedy answers to `prompts` (rendered prompt texts; `plain` marks those without a chat
    template, which get the tokenizer's own special tokens), batched with left padding and the KV cache.
    `synced`: every process of a sharded (FSDP) model calls this together, and each forward is a
    collective, so all keep stepping until the last one is done."""
    encoded = [tokenizer(p, add_special_tokens=is_plain)["input_ids"] for p, is_plain in zip(prompts, plain)]
    # longest first: one padded width per batch, and an out-of-memory error shows up at once
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    stops = stop_token_ids(tokenizer, model)
    was_training = model.training
    model.eval()
    try:
        with contiguous_head_input(model):
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                inputs = left_padded([encoded[i] for i in rows], tokenizer.pad_token_id, device)
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=stops, use_cache=True,
                                        temperature=None, top_p=None, top_k=None, synced_gpus=synced)
                new_tokens = output[:, inputs["input_ids"].shape[1]:]
                for row, tokens in zip(rows, new_tokens):
                    answers[row] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers


def answer_examples(model: nn.Module, tokenizer: Any, examples: Sequence[ChatExample], max_new_tokens: int,
                    batch_size: int, device: torch.device, synced: bool = False) -> list[str]:
    """Greedy answers of `model` to the last turn of each example (`synced`: see `generate_answers`)."""
    prompts = [prompt_text(tokenizer, e) for e in examples]
    return generate_answers(model, tokenizer, prompts, [e.plain for e in examples], max_new_tokens, batch_size,
                            device, synced)
