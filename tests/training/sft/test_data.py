"""Instruction data and assistant-only masking, on two chat templates without generation markers
(ChatML and Zephyr style) and on plain prompt/completion rows. Oracle: the assistant turns' own
text, rendered by the template, must be exactly what the unmasked tokens decode to."""

from __future__ import annotations

import pytest
import torch

from loracast.training.sft.batches import collate, left_padded, length_grouped_batches
from loracast.training.sft.data import ChatExample, read_chat_examples, split_chat_examples
from loracast.training.sft.evaluate import score_answers
from loracast.training.sft.template import IGNORE_INDEX, TemplateError, encode_all, encode_example
from tests.support.tiny_llm import build_tokenizer, triage_rows, write_jsonl


@pytest.fixture(scope="module", params=["chatml", "zephyr"])
def tokenizer(request):
    return build_tokenizer(request.param)


def _trained_text(tokenizer, encoded) -> str:
    return tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX])


def test_only_assistant_tokens_are_trained_multi_turn(tokenizer):
    example = ChatExample(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                           {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Order 123456?"},
                           {"role": "assistant", "content": '{"order_id": "123456"}'}), False, None, 1)
    encoded = encode_example(tokenizer, example)
    assert len(encoded.labels) == len(encoded.input_ids)
    trained = [label for label in encoded.labels if label != IGNORE_INDEX]
    assert trained == [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    end = tokenizer.eos_token  # each turn's end-of-turn token is learnt (so the model stops), nothing else
    assert _trained_text(tokenizer, encoded) == f'Hello.{end}{{"order_id": "123456"}}{end}'
    # the prompt's tokens are the masked ones: decoding them gives back the rest of the rendering
    rendered = tokenizer.apply_chat_template(list(example.messages), tokenize=False)
    masked = tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label == IGNORE_INDEX])
    assert "Be brief." in masked and "Order 123456?" in masked and "Hello." not in masked
    assert len(masked) + len(_trained_text(tokenizer, encoded)) == len(rendered)


def test_plain_prompt_completion_trains_the_completion_and_eos():
    tokenizer = build_tokenizer("chatml")
    example = ChatExample(({"role": "user", "content": "Intent of: my kettle broke ->"},
                           {"role": "assistant", "content": " delivery"}), True, None, 1)
    encoded = encode_example(tokenizer, example)
    assert _trained_text(tokenizer, encoded) == f" delivery{tokenizer.eos_token}"


def test_template_that_rewrites_earlier_turns_is_refused():
    tokenizer = build_tokenizer("chatml")
    # renders the last user turn differently from the earlier ones: spans cannot be found by prefixes
    tokenizer.chat_template = ("{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['role'] }}: "
                               "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    example = ChatExample(({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}), False, None, 7)
    with pytest.raises(TemplateError, match="line 7.*renders turn 1 differently"):
        encode_example(tokenizer, example)


def test_too_long_examples_are_skipped_and_counted(tmp_path):
    tokenizer = build_tokenizer("chatml")
    rows = triage_rows(6, 0)
    examples = read_chat_examples(write_jsonl(tmp_path / "rows.jsonl", rows))
    lengths = [len(encode_example(tokenizer, e).input_ids) for e in examples]
    limit = sorted(lengths)[3]
    kept, sources, skipped = encode_all(tokenizer, examples, limit)
    assert skipped == sum(n > limit for n in lengths) and len(kept) == len(sources) == 6 - skipped
    assert all(len(e.input_ids) <= limit for e in kept)


def test_both_formats_read_and_split(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}], "split": "train"},
            {"prompt": "q2", "completion": "a2", "split": "train", "source": "ignored"},
            {"prompt": [{"role": "user", "content": "q3"}], "completion": [{"role": "assistant", "content": "a3"}],
             "split": "test"}]
    examples = read_chat_examples(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert [e.plain for e in examples] == [False, True, False]
    assert [e.reference for e in examples] == ["a1", "a2", "a3"]
    train, held = split_chat_examples(examples, "mixed.jsonl")
    assert [e.line for e in train] == [1, 2] and [e.line for e in held] == [3]


def test_length_grouped_batches_cover_every_example_once_with_little_padding():
    lengths = [int(x) for x in torch.randint(10, 200, (257,), generator=torch.Generator().manual_seed(0))]
    batches = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(1))
    assert sorted(i for b in batches for i in b) == list(range(257))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    naive = sum(max(lengths[i] for i in range(s, min(s + 8, 257))) * len(range(s, min(s + 8, 257)))
                for s in range(0, 257, 8))
    assert padded < 0.8 * naive  # grouping by length cuts the padded tokens computed


def test_collate_and_left_padding():
    from loracast.training.sft.template import EncodedExample

    batch = collate([EncodedExample([5, 6, 7], [IGNORE_INDEX, 6, 7]), EncodedExample([8], [8])], 0, torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = left_padded([[1, 2, 3], [4]], 0, torch.device("cpu"))
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]] and left["attention_mask"].tolist() == [[1, 1, 1],
                                                                                                      [0, 0, 1]]


def test_json_score_is_exact():
    refs = ['{"intent": "billing", "order_id": null}', '{"intent": "delivery", "order_id": "123456"}',
            '{"intent": "account", "order_id": null}']
    answers = ['{"order_id": null, "intent": "billing"}',  # key order does not matter: same object
               '{"intent": "delivery", "order_id": 123456}',  # a number is not the string
               'Sure! {"intent": "account", "order_id": null}']  # extra text: not a JSON answer
    score = score_answers(answers, refs)
    assert score.exact == pytest.approx(1 / 3) and score.valid_json == pytest.approx(2 / 3)
    assert score.fields == {"intent": pytest.approx(2 / 3), "order_id": pytest.approx(1 / 3)}
    assert score_answers([" yes"], ["yes"]).exact == 1.0 and score_answers(["no"], ["yes"]).valid_json is None
