"""Which modules get adapted, and with which rank, equals PEFT's for each way of naming targets.

Oracle: PEFT 0.21 on the same tiny transformers model.
"""

from __future__ import annotations

import peft
import pytest
import torch

from loracast import LoraConfig, LoraLayer, get_peft_model

CASES = {
    "list-suffix": dict(target_modules=["q_proj", "v_proj"]),
    "dotted-suffix": dict(target_modules=["self_attn.q_proj", "mlp.down_proj"]),
    "regex": dict(target_modules=r".*\.layers\.1\..*(k|o)_proj"),
    "all-linear": dict(target_modules="all-linear"),
    "exclude-list": dict(target_modules="all-linear", exclude_modules=["down_proj", "o_proj"]),
    "exclude-regex": dict(target_modules=["q_proj", "k_proj"], exclude_modules=r".*layers\.0\..*"),
    "layers-to-transform": dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    "layers-pattern": dict(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers"),
    "rank-alpha-pattern": dict(target_modules=["q_proj", "v_proj", "gate_proj"],
                               rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                               alpha_pattern={"gate_proj": 32}),
    "embedding": dict(target_modules=["embed_tokens", "q_proj"]),
    "modules-to-save": dict(target_modules="all-linear", modules_to_save=["lm_head"]),
    "default-targets": dict(),
}


def adapted(model) -> dict[str, tuple[int, float]]:
    return {name: (module.r["default"], module.scaling["default"])
            for name, module in model.named_modules() if hasattr(module, "r") and isinstance(module.r, dict)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_targets_ranks_and_names_equal_peft(make_llama, case):
    ours = get_peft_model(make_llama(), LoraConfig(**CASES[case]))
    theirs = peft.get_peft_model(make_llama(), peft.LoraConfig(**CASES[case]))
    assert adapted(ours) == adapted(theirs)
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in theirs.named_parameters()}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)


def test_gpt2_conv1d_with_default_targets_equals_peft():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    state = GPT2LMHeadModel(config).state_dict()

    def build():
        model = GPT2LMHeadModel(config)
        model.load_state_dict(state)
        return model.eval()

    ours = get_peft_model(build(), LoraConfig(init_lora_weights=False))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(init_lora_weights=False))
    assert adapted(ours) == adapted(theirs)
    assert ours.peft_config["default"].fan_in_fan_out is True
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            dict(ours.named_parameters())[name].copy_(param)
        ids = torch.randint(0, 64, (2, 10))
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


def test_no_match_names_patterns_and_existing_modules(make_llama):
    with pytest.raises(ValueError) as info:
        get_peft_model(make_llama(), LoraConfig(target_modules=["qproj"]))
    message = str(info.value)
    assert "target_modules=['qproj']" in message
    assert "q_proj" in message and "down_proj" in message  # names that do exist


def test_unsupported_module_type_is_named(make_llama):
    with pytest.raises(ValueError, match=r"target module 'model.layers.0.mlp' is a LlamaMLP, which LoRA cannot adapt"):
        get_peft_model(make_llama(), LoraConfig(target_modules=["mlp"]))


def test_missing_modules_to_save_is_an_error(make_llama):
    with pytest.raises(ValueError, match=r"modules_to_save names \['classifier_head'\] match no module"):
        get_peft_model(make_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier_head"]))


def test_base_parameters_are_frozen_and_layers_wrap_the_original(make_llama):
    model = make_llama()
    original_q = model.model.layers[0].self_attn.q_proj
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"]))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLayer) and layer.base_layer is original_q
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_seq_cls_task_adds_the_head_to_modules_to_save():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        vocab_size=50, num_labels=3)
    torch.manual_seed(0)
    state = BertForSequenceClassification(config).state_dict()
    models = []
    for factory, cfg in ((get_peft_model, LoraConfig), (peft.get_peft_model, peft.LoraConfig)):
        model = BertForSequenceClassification(config)
        model.load_state_dict(state)
        models.append(factory(model, cfg(task_type="SEQ_CLS", target_modules=["query", "value"])))
    ours, theirs = models
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save.default" in n for n, _ in ours.named_parameters())
