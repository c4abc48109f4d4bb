"""Eager attention recomputed in backward (training/sft/attention.py) against transformers' eager
attention: the same loss, adapter gradients and generations bit for bit, with less kept for
backward; and models it cannot serve are left as they are."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loracast import LoraConfig, get_peft_model
from loracast.training.sft.attention import RECOMPUTED_EAGER, use_recomputed_eager
from tests.support.kept_memory import step_keeping_count
from tests.support.models import tiny_llama_config


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (3, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # padded rows: the mask must reach the recomputed attention too
    mask[2, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _model(recompute: bool, dtype: torch.dtype, dropout: float = 0.0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(attention_dropout=dropout, attn_implementation="eager")).to(dtype)
    if recompute:
        assert use_recomputed_eager(base)
        assert base.config._attn_implementation == RECOMPUTED_EAGER
    torch.manual_seed(1)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                           init_lora_weights="gaussian"))


def _step(model) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(loss, adapter gradients, bytes kept for backward) of one training step on `_batch()`."""
    return step_keeping_count(model, _batch())


@pytest.mark.parametrize(("dtype", "dropout"), [(torch.float32, 0.0), (torch.bfloat16, 0.0), (torch.float32, 0.25)])
def test_recomputed_attention_trains_bit_for_bit_as_eager(dtype, dropout):
    eager_loss, eager_grads, eager_kept = _step(_model(False, dtype, dropout))
    loss, grads, kept = _step(_model(True, dtype, dropout))
    assert torch.equal(loss, eager_loss)
    assert grads.keys() == eager_grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert torch.equal(grad, eager_grads[name]), name
    assert kept < eager_kept  # the softmax and the repeated keys and values are not kept


def test_recomputed_attention_generates_as_eager():
    prompt = _batch()["input_ids"][:1, :8]
    outputs = []
    for recompute in (False, True):
        model = _model(recompute, torch.float32).eval()
        with torch.no_grad():
            outputs.append(model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False))
    assert torch.equal(outputs[0], outputs[1])


def test_models_without_the_eager_function_are_left_alone():
    class Custom(nn.Module):  # its module (this test file) defines no eager_attention_forward
        def __init__(self) -> None:
            super().__init__()
            self.config = tiny_llama_config(attn_implementation="eager")

    model = Custom()
    assert not use_recomputed_eager(model)
    assert model.config._attn_implementation == "eager"
    from transformers import LlamaForCausalLM

    sdpa = LlamaForCausalLM(tiny_llama_config(attn_implementation="sdpa"))
    assert not use_recomputed_eager(sdpa)  # only an eager model is switched
    assert sdpa.config._attn_implementation == "sdpa"
