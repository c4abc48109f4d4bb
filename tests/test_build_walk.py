"""The cheap-construction helpers behind fast injection give ordinary modules, and the walk
gives what `named_modules` gives."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from loracast.layers import Linear, build
from loracast.tuner.match import SuffixSet
from loracast.tuner.walk import replace_child, walk


def test_built_linear_is_an_ordinary_linear():
    built = build.linear(6, 4, True, torch.float32, torch.device("cpu"), "kaiming")
    plain = nn.Linear(6, 4)
    assert type(built) is nn.Linear
    assert built.__dict__.keys() == plain.__dict__.keys()
    for key, value in plain.__dict__.items():
        assert type(built.__dict__[key]) is type(value), key
    assert built.state_dict().keys() == plain.state_dict().keys()
    assert repr(built) == repr(plain)
    # containers are its own: a hook on one module is not seen by another
    other = build.linear(6, 4, True, torch.float32, torch.device("cpu"))
    calls = []
    built.register_forward_hook(lambda *a: calls.append(1))
    other(torch.randn(2, 6))
    built(torch.randn(2, 6))
    assert calls == [1]
    moved = copy.deepcopy(built).to(torch.bfloat16)
    assert moved.weight.dtype == torch.bfloat16 and built.weight.dtype == torch.float32


def test_built_init_matches_nn_init_draw_for_draw():
    torch.manual_seed(3)
    built = build.linear(37, 5, False, torch.float32, torch.device("cpu"), "kaiming")
    torch.manual_seed(3)
    weight = torch.empty(5, 37)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    assert torch.equal(built.weight.detach(), weight)
    zeros = build.linear(3, 5, True, torch.float32, torch.device("cpu"), "zeros")
    assert not zeros.weight.any() and zeros.bias.shape == (5,)
    meta = build.linear(3, 5, False, torch.float32, torch.device("meta"), "kaiming")
    assert meta.weight.is_meta


def test_lora_linear_state_matches_its_container_types():
    layer = Linear(nn.Linear(8, 8))
    layer.update_layer("default", 2, 4, lora_dropout=0.0, init_lora_weights=True, use_rslora=False,
                       lora_bias=False, dtype=torch.float32, device=torch.device("cpu"))
    assert isinstance(layer.lora_A, nn.ModuleDict) and isinstance(layer.lora_dropout["default"], nn.Identity)
    assert [name for name, _ in layer.named_modules()] == [
        "", "base_layer", "lora_dropout", "lora_dropout.default", "lora_A", "lora_A.default", "lora_B",
        "lora_B.default"]
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias", "lora_A.default.weight",
                                       "lora_B.default.weight"}


def test_walk_is_named_modules_with_parents(make_llama):
    model = make_llama()
    shared = model.model.layers[0].mlp
    model.model.layers[1].extra = shared  # a module reachable twice appears once, at its first place
    nodes = walk(model)
    assert [n.name for n in nodes] == [name for name, _ in model.named_modules()]
    for node in nodes[1:]:
        assert node.parent._modules[node.attr] is node.module
    inside = walk(model, stop=(type(model.model.layers[0]),))
    assert "model.layers.0" in [n.name for n in inside]
    assert not [n for n in inside if n.name.startswith("model.layers.0.")]
    replacement = nn.Identity()
    node = next(n for n in nodes if n.name == "model.layers.1.mlp.act_fn")
    replace_child(node.parent, node.attr, replacement)
    assert model.model.layers[1].mlp.act_fn is replacement


def test_suffix_set_is_peft_list_matching():
    names = ["q_proj", "mlp.up_proj", "layers.1.self_attn.v_proj"]
    pattern = re.compile(r"(?:^|.*\.)(?:" + "|".join(re.escape(n) for n in names) + ")")
    matcher = SuffixSet(names)
    candidates = ["q_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj_x",
                  "model.layers.0.mlp.up_proj", "model.layers.0.xmlp.up_proj", "up_proj", "mlp.up_proj",
                  "model.layers.1.self_attn.v_proj", "model.layers.11.self_attn.v_proj", "xq_proj", ""]
    for name in candidates:
        assert matcher.fullmatch(name) == bool(pattern.fullmatch(name)), name


def test_injection_restores_the_garbage_collector_state(make_llama):
    import gc

    from loracast import LoraConfig, get_peft_model

    assert gc.isenabled()
    get_peft_model(make_llama(), LoraConfig(target_modules=["q_proj"]))
    assert gc.isenabled()
    gc.disable()
    try:
        get_peft_model(make_llama(), LoraConfig(target_modules=["q_proj"]))
        assert not gc.isenabled()  # a caller's choice to keep it off is respected
    finally:
        gc.enable()
    with pytest.raises(ValueError):
        get_peft_model(make_llama(), LoraConfig(target_modules=["nothing"]))
    assert gc.isenabled()
