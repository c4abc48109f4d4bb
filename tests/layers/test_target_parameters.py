"""`target_parameters` (LoRA on 3-D expert tensors) on a tiny Qwen3-MoE, against PEFT 0.21.2."""

from __future__ import annotations

import peft
import pytest
import torch

from loracast import ConfigError, LoraConfig, PeftModel, get_peft_model

IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def moe(dtype: torch.dtype = torch.float32):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                            num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, vocab_size=96, max_position_embeddings=64)
    return Qwen3MoeForCausalLM(config).to(dtype).eval()


def _lora(model):
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


def pair(dtype=torch.float32, autocast_adapter_dtype=True, **config):
    """One base adapted by loracast and by PEFT, LoRA factors set to the same random values."""
    config = dict(dict(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS), **config)
    ours = get_peft_model(moe(dtype), LoraConfig(**config), autocast_adapter_dtype=autocast_adapter_dtype)
    theirs = peft.get_peft_model(moe(dtype), peft.LoraConfig(**config), autocast_adapter_dtype=autocast_adapter_dtype)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for (name, mine), (other, their) in zip(_lora(ours), _lora(theirs), strict=True):
            assert name == other
            values = (torch.randn(mine.shape, generator=generator) * 0.2).to(dtype)
            mine.copy_(values)
            their.copy_(values)
    return ours.eval(), theirs.eval()


def test_names_shapes_and_fp32_outputs_equal_peft():
    ours, theirs = pair()
    mine = {n: (tuple(p.shape), p.requires_grad) for n, p in ours.named_parameters()}
    other = {n: (tuple(p.shape), p.requires_grad) for n, p in theirs.named_parameters()}
    assert mine == other
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.default.weight" in mine
    # oracle: PEFT's fp32 logits; tolerance: the same sums in another order (einsum vs bmm)
    torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_files_load_both_ways(tmp_path):
    ours, theirs = pair()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    expected = ours(input_ids=IDS).logits
    peft_loaded = peft.PeftModel.from_pretrained(moe(), tmp_path / "ours").eval()
    ours_loaded = PeftModel.from_pretrained(moe(), tmp_path / "theirs").eval()
    torch.testing.assert_close(peft_loaded(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_loaded(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


def _experts_run(wrapper, dtype, autocast):
    """The first layer's experts on fixed inputs and fixed routing (routing is discrete: a near tie
    decided differently would swamp the rounding being compared)."""
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(10, 32, generator=generator).to(dtype)
    index = torch.randint(0, 4, (10, 2), generator=generator)
    weights = torch.rand(10, 2, generator=generator).to(dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return wrapper(hidden, index, weights).double(), (hidden, index, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flag", [True, False])
def test_dtype_matrix_against_peft_and_float64(dtype, flag):
    ours, theirs = pair(dtype, autocast_adapter_dtype=flag)
    assert {p.dtype for _, p in _lora(ours)} == {p.dtype for _, p in _lora(theirs)} == {torch.float32 if flag else dtype}
    outer = ours.base_model.model.model.layers[0].mlp.experts
    for autocast in (False, True):
        mine, inputs = _experts_run(outer, dtype, autocast)
        other, _ = _experts_run(theirs.base_model.model.model.layers[0].mlp.experts, dtype, autocast)
        # oracle: the same experts in float64, each parameter plus its update computed in float64
        exact = _experts_float64(outer, *inputs)
        error_ours, error_peft = (mine - exact).abs().max().item(), (other - exact).abs().max().item()
        scale = exact.abs().max().item()
        limit = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}[torch.bfloat16 if autocast else dtype]
        assert error_ours <= limit * scale and error_peft <= limit * scale * 2
        if dtype == torch.float32 and not autocast:
            torch.testing.assert_close(mine, other, rtol=1e-5, atol=1e-6)  # fp32: the same values as PEFT


def _experts_float64(outer, hidden, index, weights):
    """Qwen3-MoE's expert sum for fixed routing, in float64, each weight plus its update in float64."""
    real = outer.base_layer.base_layer
    with torch.no_grad():
        gate_up = real.gate_up_proj.double() + outer.base_layer.get_delta_weight("default")
        down = real.down_proj.double() + outer.get_delta_weight("default")
        hidden, weights = hidden.double(), weights.double()
        exact = torch.zeros_like(hidden)
        for token in range(hidden.shape[0]):
            for slot, expert in enumerate(index[token].tolist()):
                gate, up = (gate_up[expert] @ hidden[token]).chunk(2)
                exact[token] += weights[token, slot] * (down[expert] @ (torch.nn.functional.silu(gate) * up))
    return exact


def test_merge_rounds_once_and_unmerge_restores_bits():
    dtype = torch.bfloat16
    ours, _ = pair(dtype)
    experts = ours.base_model.model.model.layers[0].mlp.experts
    inner = experts.base_layer
    param = inner.base_layer.gate_up_proj
    before = param.detach().clone()
    expected = ours(input_ids=IDS).logits
    ours.merge_adapter()
    # oracle: the float64 sum of base and update, rounded once to the base dtype
    exact = (before.double() + inner.get_delta_weight("default")).to(dtype)
    assert torch.equal(param, exact)
    # oracle: the unmerged forward, which rounds the same sum once per step: bf16 resolution
    torch.testing.assert_close(ours(input_ids=IDS).logits, expected, rtol=3e-2, atol=3e-2)
    ours.unmerge_adapter()
    assert torch.equal(param, before)
    plain = ours.merge_and_unload()
    assert type(plain.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    torch.testing.assert_close(plain(input_ids=IDS).logits, expected, rtol=3e-2, atol=3e-2)


def test_training_step_matches_peft_and_touches_only_adapters():
    ours, theirs = pair()
    grads = []
    for model in (ours, theirs):
        model.train()
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in _lora(model)})
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[0].values())
    for name in grads[0]:  # oracle: PEFT's fp32 gradients
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_refusals_name_the_field():
    with pytest.raises(ConfigError, match="lora_dropout"):
        get_peft_model(moe(), LoraConfig(target_parameters=EXPERTS, lora_dropout=0.1))
    with pytest.raises(ConfigError, match="target_parameters"):
        get_peft_model(moe(), LoraConfig(target_parameters=["mlp.experts.nothing"]))
    with pytest.raises(ConfigError, match="target_parameters"):
        LoraConfig(target_parameters="mlp.experts.gate_up_proj")
