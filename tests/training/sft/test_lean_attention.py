"""Lean eager attention (training/sft/lean_attention.py) against transformers' own eager attention:
the same outputs and gradients bit for bit, nothing kept for backward beyond query, keys and
values, and the model's eager function wherever that would not hold."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loracast import LoraConfig, get_peft_model
from loracast.training.sft.lean_attention import LEAN_EAGER, lean_eager_attention, use_lean_eager
from tests.support.kept_memory import step_keeping_count
from tests.support.models import tiny_llama_config


def _attention_module(heads: int, kv_heads: int) -> nn.Module:
    from transformers.models.llama.modeling_llama import LlamaAttention

    config = tiny_llama_config(hidden_size=heads * 16, num_attention_heads=heads, num_key_value_heads=kv_heads,
                               head_dim=16)
    module = LlamaAttention(config, 0).train()
    assert use_lean_eager(_Holder(module, config))  # the class passes its probe
    return module


class _Holder(nn.Module):
    """A model-like wrapper of one attention module, for `use_lean_eager`."""

    def __init__(self, attention: nn.Module, config) -> None:
        super().__init__()
        self.attention = attention
        self.config = config
        self.config._attn_implementation = "eager"

    def set_attn_implementation(self, name: str) -> None:
        self.config._attn_implementation = name


def _inputs(batch: int, heads: int, kv_heads: int, length: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(length)
    # the query as the projections and rotary embedding leave it: heads interleaved in memory
    query = torch.randn(batch, length, heads, 16, generator=generator).to(dtype).transpose(1, 2)
    key, value = (torch.randn(batch, kv_heads, length, 16, generator=generator).to(dtype) for _ in range(2))
    hidden = torch.ones(batch, 1, length, length, dtype=torch.bool).triu(1)
    hidden[0, :, :, : length // 3] = True  # left padding in the first row
    mask = torch.zeros(hidden.shape, dtype=dtype).masked_fill(hidden, torch.finfo(dtype).min)
    return query, key, value, mask


def _run(function, module, inputs, kept: list[int] | None = None):
    query, key, value, mask = (t.clone().requires_grad_(t is not inputs[3]) for t in inputs)
    own = {t.untyped_storage().data_ptr() for t in (query, key, value, mask)}
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output, _ = function(module, query, key, value, mask, scaling=module.scaling)
    output.backward(torch.cos(torch.arange(output.numel(), dtype=torch.float32)).view(output.shape).to(output.dtype))
    if kept is not None:
        kept.append(sum(size for pointer, size in sizes.items() if pointer not in own))
    return [output.detach(), query.grad, key.grad, value.grad]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4)])
@pytest.mark.parametrize(("batch", "length"), [(1, 7), (4, 33)])
def test_lean_attention_is_eager_bit_for_bit(dtype, heads, kv_heads, batch, length):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    module = _attention_module(heads, kv_heads)
    inputs = _inputs(batch, heads, kv_heads, length, dtype)
    eager = _run(eager_attention_forward, module, inputs)
    lean = _run(lean_eager_attention, module, inputs)
    for name, own, ours in zip(("output", "query grad", "key grad", "value grad"), eager, lean, strict=True):
        assert own.dtype == ours.dtype and torch.equal(own, ours), name


def test_lean_attention_keeps_only_its_inputs():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    module = _attention_module(9, 3)  # SmolLM2's grouping
    inputs = _inputs(8, 9, 3, 64, torch.bfloat16)
    kept: list[int] = []
    _run(eager_attention_forward, module, inputs, kept)
    _run(lean_eager_attention, module, inputs, kept)
    eager_kept, lean_kept = kept
    # eager: the repeated keys and values, the float32 softmax and its bf16 copy; lean: nothing
    # besides query, key, value and mask, which the layer holds anyway
    scores = 8 * 9 * 64 * 64 * 2
    assert lean_kept == 0
    assert eager_kept >= 3 * scores


def _model(lean: bool, dtype: torch.dtype, dropout: float = 0.0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(attention_dropout=dropout, hidden_size=96, num_attention_heads=6,
                                              num_key_value_heads=2, attn_implementation="eager")).to(dtype)
    if lean:
        assert use_lean_eager(base)
        assert base.config._attn_implementation == LEAN_EAGER
    torch.manual_seed(1)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                           init_lora_weights="gaussian"))


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (3, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    mask[2, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize(("dtype", "dropout"), [(torch.float32, 0.0), (torch.bfloat16, 0.0), (torch.bfloat16, 0.25)])
def test_a_model_with_lean_attention_trains_bit_for_bit_as_eager(dtype, dropout):
    eager_loss, eager_grads, eager_kept = step_keeping_count(_model(False, dtype, dropout), _batch())
    loss, grads, kept = step_keeping_count(_model(True, dtype, dropout), _batch())
    assert torch.equal(loss, eager_loss)
    assert grads.keys() == eager_grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert torch.equal(grad, eager_grads[name]), name
    if dropout:
        assert kept == eager_kept  # attention dropout in training: the model's own eager function
    else:
        assert kept < eager_kept


def test_a_model_with_lean_attention_generates_as_eager():
    prompt = _batch()["input_ids"][:1, :8]
    outputs = []
    for lean in (False, True):
        model = _model(lean, torch.bfloat16).eval()
        with torch.no_grad():
            outputs.append(model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False))
    assert torch.equal(outputs[0], outputs[1])


def test_soft_capped_scores_run_the_models_own_eager_function():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=128, attn_logit_softcapping=20.0,
                          attn_implementation="eager")
    models = []
    for lean in (False, True):
        torch.manual_seed(0)
        model = Gemma2ForCausalLM(config).to(torch.bfloat16)
        if lean:
            use_lean_eager(model)
        models.append(model)
    eager_loss, eager_grads, eager_kept = step_keeping_count(models[0], _batch())
    loss, grads, kept = step_keeping_count(models[1], _batch())
    assert torch.equal(loss, eager_loss) and kept == eager_kept
    assert all(torch.equal(grad, eager_grads[name]) for name, grad in grads.items())


def test_models_it_cannot_serve_are_left_alone():
    class Custom(nn.Module):  # its module (this test file) defines no eager_attention_forward
        def __init__(self) -> None:
            super().__init__()
            self.config = tiny_llama_config(attn_implementation="eager")

        def set_attn_implementation(self, name: str) -> None:
            self.config._attn_implementation = name

    model = Custom()
    assert not use_lean_eager(model)
    assert model.config._attn_implementation == "eager"
    from transformers import LlamaForCausalLM

    sdpa = LlamaForCausalLM(tiny_llama_config(attn_implementation="sdpa"))
    assert not use_lean_eager(sdpa)  # only an eager model is switched
    assert sdpa.config._attn_implementation == "sdpa"


def test_asking_for_it_by_name_on_a_model_it_cannot_serve_is_refused():
    from transformers import LlamaForCausalLM

    from loracast.training.common.errors import SetupError
    from loracast.training.sft.model import _train_attention

    sdpa = LlamaForCausalLM(tiny_llama_config(attn_implementation="sdpa"))
    with pytest.raises(SetupError, match="--attention eager_lean.*use --attention eager"):
        _train_attention(sdpa, LEAN_EAGER, torch.device("cpu"))
    _train_attention(sdpa, "auto", torch.device("cpu"))  # auto keeps what it cannot switch
    assert sdpa.config._attn_implementation == "sdpa"
    eager = LlamaForCausalLM(tiny_llama_config(attn_implementation="eager"))
    _train_attention(eager, "auto", torch.device("cpu"))
    assert eager.config._attn_implementation == LEAN_EAGER
