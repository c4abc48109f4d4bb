"""transformers' Trainer trains loracast models and saves only the adapter, through
transformers' PEFT-integration attributes (never through peft: the entry point transformers
would use to reach peft is made to fail in these tests)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from loracast import LoraConfig, PeftModel, get_peft_model
from loracast.integrations import transformers as integration

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def tiny_classifier(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3, initializer_range=0.2)
    return BertForSequenceClassification(config)


class Rows(torch.utils.data.Dataset):
    """Random token rows whose label is the first token's residue mod 3 (learnable)."""

    def __init__(self, count: int = 48) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 64, (count, 8), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % 3}


@pytest.fixture
def no_peft_route(monkeypatch):
    """Every transformers method that would hand our model to peft calls check_peft_version first."""
    import transformers.integrations.peft as hf_peft

    def refuse(*args, **kwargs):
        raise AssertionError("transformers tried to use peft on a loracast model")

    monkeypatch.setattr(hf_peft, "check_peft_version", refuse)


def same_base_other_head():
    """The base the adapter was trained on, with a different classification head (the adapter brings its own)."""
    model = tiny_classifier(seed=0)
    torch.nn.init.normal_(model.classifier.weight)
    return model


def make_trainer(model, out, **overrides):
    from transformers import Trainer, TrainingArguments

    values = dict(output_dir=str(out), use_cpu=True, max_steps=4, per_device_train_batch_size=8, learning_rate=5e-3,
                  report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    values.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**values), train_dataset=Rows())


def test_trainer_saves_only_the_adapter_and_it_loads_back(tmp_path, no_peft_route):
    from peft import PeftModel as PeftPeftModel
    from transformers.trainer_utils import _is_peft_model

    peft_model = get_peft_model(tiny_classifier(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query",
                                                                                                          "value"]))
    model = peft_model.get_base_model()
    assert not _is_peft_model(model)  # the attribute route, not isinstance(peft.PeftModel)
    trainer = make_trainer(model, tmp_path / "run", save_strategy="steps", save_steps=4)
    trainer.train()
    assert set(os.listdir(tmp_path / "run" / "checkpoint-4")) >= ADAPTER_FILES
    assert not {"model.safetensors", "config.json"} & set(os.listdir(tmp_path / "run" / "checkpoint-4"))
    trainer.save_model(str(tmp_path / "final"))
    assert set(os.listdir(tmp_path / "final")) == ADAPTER_FILES | {"training_args.bin"}

    # the same tensors as loracast's own save_pretrained
    peft_model.save_pretrained(tmp_path / "ours")
    saved = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert saved.keys() == ours.keys()
    assert all(torch.equal(saved[k], ours[k]) for k in saved)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in saved.items())  # trained

    inputs = Rows()[0]["input_ids"][None]
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=inputs).logits
        reloaded = PeftModel.from_pretrained(same_base_other_head(), tmp_path / "final").eval()
        torch.testing.assert_close(reloaded(input_ids=inputs).logits, expected, rtol=0, atol=1e-6)
    with torch.no_grad():  # PEFT reads the Trainer-written folder too
        theirs = PeftPeftModel.from_pretrained(same_base_other_head(), str(tmp_path / "final")).eval()
        torch.testing.assert_close(theirs(input_ids=inputs).logits, expected, rtol=0, atol=1e-6)


def test_trainer_with_activation_checkpointing_reaches_the_adapters(tmp_path, no_peft_route):
    peft_model = get_peft_model(tiny_classifier(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query",
                                                                                                          "value"]))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_A" in n}
    trainer = make_trainer(peft_model.get_base_model(), tmp_path, max_steps=2, gradient_checkpointing=True,
                           gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer.train()
    after = dict(peft_model.named_parameters())
    # lora_A only changes once lora_B is non-zero, i.e. when gradients flow through checkpointed blocks
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_merge_and_unload_gives_back_a_plain_model(tmp_path):
    peft_model = get_peft_model(tiny_classifier(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    assert peft_model.get_base_model()._hf_peft_config_loaded is True
    assert peft_model.get_base_model().active_adapters() == ["default"]
    merged = peft_model.merge_and_unload()
    assert not any(name in merged.__dict__ for name in integration.INSTALLED_ATTRIBUTES)
    assert getattr(merged, "_hf_peft_config_loaded", False) is False
    merged.save_pretrained(str(tmp_path))
    assert "model.safetensors" in os.listdir(tmp_path) and "adapter_config.json" not in os.listdir(tmp_path)


def test_trainer_trains_a_4bit_base(tmp_path, no_peft_route):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    tiny_classifier().save_pretrained(str(tmp_path / "base"))
    quantized = AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "base"), device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["classifier"]))
    assert quantized.is_quantized
    peft_model = get_peft_model(quantized, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    # without loracast's attributes transformers refuses: "You cannot perform fine-tuning on purely quantized models"
    trainer = make_trainer(peft_model.get_base_model(), tmp_path / "run", max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert set(os.listdir(tmp_path / "final")) == ADAPTER_FILES | {"training_args.bin"}


def test_installed_methods_survive_deepcopy_and_pickle():
    import copy
    import pickle

    peft_model = get_peft_model(tiny_classifier(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    model = peft_model.get_base_model()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        key = next(k for k in clone.get_adapter_state_dict() if k.endswith("lora_B.weight"))
        name = key.replace("lora_B.weight", "lora_B.default.weight")
        with torch.no_grad():
            clone.get_parameter(name).fill_(3.0)
        assert torch.all(clone.get_adapter_state_dict()[key] == 3.0)  # the clone's own tensors
        assert torch.all(model.get_adapter_state_dict()[key] == 0.0)  # the original is untouched
        assert clone.active_adapters() == ["default"] and clone.peft_config["default"].r == 4
