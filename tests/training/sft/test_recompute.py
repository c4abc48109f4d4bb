"""Gated MLP activations and RMS norm inputs recomputed in backward (training/sft/recompute.py)
against the model's own modules: the same loss and adapter gradients bit for bit (dropout
included), two intermediate-width tensors per layer and half of each bf16 norm's kept bytes less
kept for backward, the same parameter names; MLPs whose forward it does not reproduce are left
alone, and the model's own modules come back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loracast import LoraConfig, get_peft_model
from loracast.training.sft.recompute import (
    Recomputed,
    RecomputedGatedMlp,
    RecomputedNorm,
    recompute_cheap_activations,
    restore_modules,
)
from tests.support.kept_memory import step_keeping_count
from tests.support.models import tiny_llama_config


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (3, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _model(dtype: torch.dtype, dropout: float = 0.0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(attn_implementation="eager")).to(dtype)
    torch.manual_seed(1)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                           init_lora_weights="gaussian"))


def _step(model) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(loss, adapter gradients, bytes kept for backward) of one training step on `_batch()`."""
    return step_keeping_count(model, _batch())


@pytest.mark.parametrize(("dtype", "dropout"), [(torch.float32, 0.0), (torch.bfloat16, 0.0), (torch.bfloat16, 0.25)])
def test_recomputed_activations_train_bit_for_bit_as_the_models_modules(dtype, dropout):
    own_loss, own_grads, own_kept = _step(_model(dtype, dropout))
    model = _model(dtype, dropout)
    layers = model.get_base_model().config.num_hidden_layers
    assert recompute_cheap_activations(model) == Recomputed(gated_mlps=layers, norms=2 * layers + 1)
    loss, grads, kept = _step(model)
    assert torch.equal(loss, own_loss)
    assert grads.keys() == own_grads.keys() and len(grads) == layers * 7 * 2
    for name, grad in grads.items():
        assert torch.equal(grad, own_grads[name]), name
    # each layer keeps two tensors of 3 x 24 positions x the intermediate width less (the activation's
    # output and the product the down projection's adapter needs), and
    # in bf16 each norm that passes a gradient back (all but the first, after the frozen embedding)
    # keeps its bf16 input instead of its float32 copy
    config = model.get_base_model().config
    width = torch.finfo(dtype).bits // 8
    one_activation = 3 * 24 * config.intermediate_size * width
    one_norm = 3 * 24 * config.hidden_size * (4 - width) if width < 4 else 0
    assert own_kept - kept >= layers * 2 * one_activation + 2 * layers * one_norm


def test_names_stay_and_the_models_own_modules_come_back():
    model = _model(torch.float32)
    names = [name for name, _ in model.named_parameters()]
    layer = model.get_base_model().model.layers[0]
    own_mlp, own_norm = layer.mlp, layer.input_layernorm
    recompute_cheap_activations(model)
    assert isinstance(layer.mlp, RecomputedGatedMlp) and isinstance(layer.input_layernorm, RecomputedNorm)
    assert [name for name, _ in model.named_parameters()] == names
    assert model.state_dict().keys() == _model(torch.float32).state_dict().keys()
    layers = model.get_base_model().config.num_hidden_layers
    assert restore_modules(model) == Recomputed(gated_mlps=layers, norms=2 * layers + 1)
    assert layer.mlp is own_mlp and layer.input_layernorm is own_norm
    assert [name for name, _ in model.named_parameters()] == names


class _UpGated(nn.Module):
    """Has a gated MLP's parts, but gates the up projection: not the forward the swap reproduces."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


def test_mlps_it_does_not_reproduce_are_left_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    assert recompute_cheap_activations(gpt2) == Recomputed()  # no gate/up/down projections, LayerNorms
    holder = nn.Sequential(_UpGated())
    assert recompute_cheap_activations(holder) == Recomputed()
    assert isinstance(holder[0], _UpGated)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_sft_model_swaps_them_in_unless_whole_layers_are_checkpointed(tiny_llama, checkpointing):
    from loracast.training.sft.model import LlmSpec, build_sft_model, load_llm_tokenizer

    spec = LlmSpec(source=tiny_llama, gradient_checkpointing=checkpointing)
    model = build_sft_model(spec, "stable", torch.device("cpu"), load_llm_tokenizer(tiny_llama))
    swapped = [m for m in model.modules() if isinstance(m, RecomputedGatedMlp | RecomputedNorm)]
    # whole-layer checkpointing keeps none of these activations in the first place
    assert bool(swapped) is not checkpointing
