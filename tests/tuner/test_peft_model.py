"""`PeftModel`'s API on a transformers model, compared with PEFT where PEFT defines the behaviour."""

from __future__ import annotations

import peft
import pytest
import torch

from loracast import LoraConfig, PeftModel, get_peft_model
from tests.support.models import randomize_adapters

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def test_counts_and_printout_equal_peft(make_llama, capsys):
    config = dict(target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"])
    ours = get_peft_model(make_llama(torch.bfloat16), LoraConfig(**config))
    theirs = peft.get_peft_model(make_llama(torch.bfloat16), peft.LoraConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.print_trainable_parameters()
    mine = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert mine == capsys.readouterr().out


def test_forward_kwargs_generate_config_and_base_model(make_llama):
    base = make_llama()
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert model.get_base_model() is base
    assert model.config.model_type == "llama"  # attributes come from the wrapped model
    out = model(input_ids=IDS, labels=IDS)
    assert out.loss.ndim == 0 and out.logits.shape == (2, 12, 128)
    generated = model.generate(input_ids=IDS[:, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 7)


def test_training_lowers_the_loss_and_touches_only_adapters(make_llama):
    model = get_peft_model(make_llama(torch.bfloat16), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_gradient_checkpointing_still_trains_the_adapters(make_llama):
    base = make_llama()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_adapter_lifecycle(make_llama):
    model = get_peft_model(make_llama(), LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("b", LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)  # the new adapter starts frozen

    model.set_adapter("b")
    assert model.active_adapter == "b"
    assert all(".b." in n for n, p in model.named_parameters() if p.requires_grad)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.active_adapters == ["b"]

    with pytest.raises(ValueError, match=r"adapter\(s\) \['zzz'\] not found"):
        model.set_adapter("zzz")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("b", LoraConfig(target_modules=["q_proj"]))

    model.merge_adapter(["b"])
    with pytest.raises(RuntimeError, match="merged into the base weights; call unmerge_adapter"):
        model.delete_adapter("b")
    assert "b" in model.peft_config
    model.unmerge_adapter()
    model.delete_adapter("b")
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
    assert not any(".b." in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="not found"):
        model.delete_adapter("b")


def test_multiple_adapters_outputs_match_peft_after_switching(make_llama, tmp_path):
    theirs = peft.get_peft_model(make_llama(), peft.LoraConfig(target_modules=["q_proj", "v_proj"]))
    theirs.add_adapter("b", peft.LoraConfig(target_modules=["k_proj"], r=4))
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make_llama(), tmp_path)
    ours.load_adapter(tmp_path / "b", "b")
    with torch.no_grad():
        for name in ("b", "default"):
            ours.set_adapter(name)
            theirs.set_adapter(name)
            torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5, rtol=0)
        with ours.disable_adapter(), theirs.disable_adapter():
            torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5, rtol=0)


def test_inference_mode_config_freezes_the_adapter(make_llama):
    model = get_peft_model(make_llama(), LoraConfig(target_modules=["q_proj"], inference_mode=True))
    assert not any(p.requires_grad for p in model.parameters())


def test_unknown_from_pretrained_arguments_are_refused(make_llama, tmp_path):
    get_peft_model(make_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="torch_dtype.*use adapter_dtype="):
        PeftModel.from_pretrained(make_llama(), tmp_path, torch_dtype=torch.bfloat16)


def test_wrapping_a_peft_model_twice_is_refused(make_llama):
    model = get_peft_model(make_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already is a PeftModel"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"]))
