"""``--packing`` (training/sft/packing.py): rows hold whole examples within --max-length, and a
packed example sees only itself. Oracle: the same examples unpacked (one per padded row): equal
logits, and an equal summed loss on the assistant tokens."""

from __future__ import annotations

import itertools

import pytest
import torch

from loracast import LoraConfig, get_peft_model
from loracast.training.sft.batches import collate
from loracast.training.sft.loss import AssistantLoss
from loracast.training.sft.packing import PackedCollator, isolates_packed_examples, pack
from loracast.training.sft.template import IGNORE_INDEX, encode_all
from tests.support.tiny_llm import build_tokenizer, triage_rows


@pytest.fixture(scope="module")
def encoded():
    from loracast.training.sft.data import ChatExample

    tokenizer = build_tokenizer()
    examples = [ChatExample(tuple(r["messages"]), False, None, i) for i, r in enumerate(triage_rows(12, 0))]
    return encode_all(tokenizer, examples, 400)[0], tokenizer


def _llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config)


def test_rows_hold_whole_examples_within_the_length(encoded):
    examples, _ = encoded
    longest = max(len(e.input_ids) for e in examples)
    rows = pack(examples, 2 * longest)
    assert sum(r.examples for r in rows) == len(examples) and len(rows) < len(examples)
    assert all(len(r.input_ids) <= 2 * longest for r in rows)
    # every example appears whole: its tokens, its positions from 0, its labels but the first
    pieces = sorted(tuple(e.input_ids) for e in examples)
    found = []
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        for a, b in itertools.pairwise(starts):
            found.append(tuple(row.input_ids[a:b]))
            assert row.labels[a] == IGNORE_INDEX
    assert sorted(found) == pieces


def test_a_packed_batch_gives_the_unpacked_loss_and_logits(encoded):
    examples, tokenizer = encoded
    model = get_peft_model(_llama(len(tokenizer)), LoraConfig(r=4, target_modules="all-linear",
                                                               init_lora_weights="gaussian"))
    model.eval()
    members = examples[:3]
    rows = pack(members, sum(len(e.input_ids) for e in members))
    assert len(rows) == 1
    packed = PackedCollator(tokenizer.pad_token_id)(rows)
    packed.pop("num_tokens"), packed.pop("num_examples")
    unpacked = collate(members, tokenizer.pad_token_id, torch.device("cpu"))
    loss_of = AssistantLoss(model)
    with torch.no_grad():
        total_packed, count_packed = loss_of.summed(packed)
        total, count = loss_of.summed(unpacked)
    assert count_packed == count
    torch.testing.assert_close(total_packed, total, rtol=1e-5, atol=1e-5)
    assert isolates_packed_examples(model, members, torch.device("cpu"))


def test_a_model_that_ignores_position_restarts_is_caught(encoded):
    examples, tokenizer = encoded
    model = _llama(len(tokenizer))
    original = model.forward

    def leaky(input_ids=None, position_ids=None, **kwargs):
        # positions dropped: attention spans the whole row, as in a model without packed-sequence masks
        return original(input_ids=input_ids, **kwargs)

    model.forward = leaky
    assert not isolates_packed_examples(model, examples[:2], torch.device("cpu"))


def test_packed_training_run(tmp_path, tiny_llama, chat_data):
    import json

    from tests.support.tiny_llm import run_sft

    out = run_sft(tiny_llama, chat_data, tmp_path / "out", "--packing", "--dtype", "fp32")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["packing"] is True and metrics["train"]["rows"] < metrics["train"]["examples"]
    steps = metrics["history"]["steps"]
    assert len(steps) == 4 and all(s["examples"] >= 4 for s in steps)  # 4 rows a step, each of one or more
    assert metrics["eval"]["after"]["loss"] < metrics["eval"]["before"]["loss"]
