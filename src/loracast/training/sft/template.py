"""From conversations to token ids with a loss mask on the assistant's tokens only.

Most chat templates (SmolLM2's, Llama's, Mistral's) carry no ``{% generation %}`` markers, so the
assistant spans are found by rendering: for each assistant turn, the conversation before it
rendered with the generation prompt ends where the turn's text begins, and the conversation up
to and including it ends where the turn ends (its end-of-turn token included, so the model learns
to stop). The whole conversation is tokenized once, and a token is trained on when its first
character falls inside an assistant span. This needs a template that renders earlier turns the
same whatever follows them; one that does not is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loracast.training.common.errors import DataError
from loracast.training.sft.data import ChatExample

IGNORE_INDEX = -100  # label of tokens the loss skips (PyTorch's and transformers' convention)


class TemplateError(DataError):
    """The tokenizer cannot render the data as asked (no chat template, or one whose spans cannot be found)."""


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one conversation and their labels (`IGNORE_INDEX` outside assistant turns)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        """How many tokens the loss covers."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def check_template(tokenizer: Any, examples: Sequence[ChatExample], source: str) -> None:
    """Refuse conversational data for a tokenizer without a chat template.

    Raises:
        TemplateError: with the fix (plain prompt/completion rows, or ``--chat-template FILE``).
    """
    if getattr(tokenizer, "chat_template", None):
        return
    conversational = next((e for e in examples if not e.plain), None)
    if conversational is not None:
        raise TemplateError(f"{source}: line {conversational.line} is a conversation, but the model's tokenizer has "
                            "no chat template; use plain 'prompt'/'completion' string rows, or pass a Jinja template "
                            "with --chat-template FILE")


def render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    """`messages` as text by the tokenizer's chat template."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def prompt_text(tokenizer: Any, example: ChatExample) -> str:
    """What the model is given to answer `example`'s last turn."""
    if example.plain:
        return example.messages[0]["content"]
    return render(tokenizer, example.prompt_messages, generation_prompt=True)


def assistant_spans(tokenizer: Any, example: ChatExample) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [start, end) character spans of its assistant turns).

    Raises:
        TemplateError: the template renders a turn differently once later turns follow it.
    """
    if example.plain:
        prompt, completion = example.messages[0]["content"], example.messages[1]["content"]
        eos = tokenizer.eos_token or ""
        return prompt + completion + eos, [(len(prompt), len(prompt) + len(completion) + len(eos))]
    messages = list(example.messages)
    full = render(tokenizer, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:index], generation_prompt=True)
        through = render(tokenizer, messages[:index + 1], generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            raise TemplateError(f"line {example.line}: the chat template renders turn {index} differently when later "
                                "turns follow it, so the assistant's tokens cannot be found; use prompt/completion "
                                "rows, or a template that renders earlier turns unchanged (--chat-template FILE)")
        # the turn's end-of-turn token is trained on; the whitespace a template puts after it is not
        spans.append((len(before), len(before) + len(through[len(before):].rstrip())))
    return full, spans


def encode_example(tokenizer: Any, example: ChatExample) -> EncodedExample:
    """Token ids of `example` with labels on the assistant's tokens only.

    Raises:
        TemplateError: the tokenizer cannot report character offsets (a slow tokenizer), or the
            template's assistant spans cannot be found.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(f"{type(tokenizer).__name__} is a slow tokenizer; assistant-only loss needs character "
                            "offsets, which fast tokenizers (tokenizers library) give: load it with use_fast=True")
    text, spans = assistant_spans(tokenizer, example)
    # plain text gets the tokenizer's own special tokens (BOS); a chat template writes its own
    encoded = tokenizer(text, add_special_tokens=example.plain, return_offsets_mapping=True)
    labels = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        inside = end > start and any(a <= start < b for a, b in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return EncodedExample(list(encoded["input_ids"]), labels)


def encode_all(tokenizer: Any, examples: Sequence[ChatExample], max_length: int
               ) -> tuple[list[EncodedExample], list[ChatExample], int]:
    """(encodings, their examples, how many were skipped) for `examples`: an example longer than
    `max_length` tokens, or whose answer was cut away, is skipped rather than truncated (a cut
    answer would teach the model to stop mid-answer)."""
    kept, sources, skipped = [], [], 0
    for example in examples:
        encoded = encode_example(tokenizer, example)
        if len(encoded.input_ids) > max_length or encoded.trained_tokens == 0:
            skipped += 1
            continue
        kept.append(encoded)
        sources.append(example)
    return kept, sources, skipped
