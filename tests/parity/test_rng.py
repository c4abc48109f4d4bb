"""Same seed, same config: loracast draws the same initial adapter values as PEFT, in the same
order, so a training script gives the same losses after switching the import.

Oracle: PEFT 0.21.2 run on an identical model from the same torch random state; tolerance: none
(bit-equal tensors, equal losses, and the random stream left in the same state afterwards).
"""

from __future__ import annotations

import peft
import pytest
import torch

import loracast
from tests.support.models import mixed_net, train_losses


def tiny_llama(dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).to(dtype)


def adapters_after_seed(library, model, seed: int = 123, **kwargs):
    torch.manual_seed(seed)
    config_kwargs = {k: v for k, v in kwargs.items() if k != "autocast_adapter_dtype"}
    peft_model = library.get_peft_model(model, library.LoraConfig(r=4, **config_kwargs),
                                        autocast_adapter_dtype=kwargs.get("autocast_adapter_dtype", True))
    values = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    return values, torch.rand(4)  # the next draw shows the random stream was advanced alike


@pytest.mark.parametrize("init", [True, False, "gaussian"])
@pytest.mark.parametrize("dtype,autocast", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_initial_adapters_equal_peft(init, dtype, autocast):
    kwargs = dict(target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"], init_lora_weights=init,
                  lora_bias=False, autocast_adapter_dtype=autocast)
    theirs, their_next = adapters_after_seed(peft, tiny_llama(dtype), **kwargs)
    ours, our_next = adapters_after_seed(loracast, tiny_llama(dtype), **kwargs)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name
    assert torch.equal(our_next, their_next)


def test_initial_adapters_equal_peft_with_bias_and_every_layer_type():
    targets = ["emb", "lin", "gpt_conv", "conv1d", "conv2d"]
    for init in (True, False):
        theirs, their_next = adapters_after_seed(peft, mixed_net(), target_modules=targets, init_lora_weights=init)
        ours, our_next = adapters_after_seed(loracast, mixed_net(), target_modules=targets, init_lora_weights=init)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
        assert torch.equal(our_next, their_next)
    kwargs = dict(target_modules="all-linear", lora_bias=True, init_lora_weights=False)
    theirs, _ = adapters_after_seed(peft, tiny_llama(torch.bfloat16), **kwargs)
    ours, _ = adapters_after_seed(loracast, tiny_llama(torch.bfloat16), **kwargs)
    assert any(k.endswith("lora_B.default.bias") for k in ours)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def three_losses(library) -> list[float]:
    """The same training script, with dropout in the adapters (which draws from the stream too)."""
    torch.manual_seed(42)
    model = library.get_peft_model(tiny_llama(), library.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                    target_modules="all-linear"))
    model.train()
    return train_losses(model, torch.randint(0, 64, (4, 12)), steps=3, lr=1e-2)


def test_same_losses_as_peft_for_three_steps():
    theirs = three_losses(peft)
    ours = three_losses(loracast)
    assert ours == theirs  # exact: same initial values, same dropout masks, same arithmetic
    assert theirs[2] < theirs[0]
