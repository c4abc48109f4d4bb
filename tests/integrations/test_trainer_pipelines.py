"""The one-import switch inside real training pipelines, each row against PEFT doing the same:
transformers' `Trainer` given the PeftModel (columns kept, adapter-only checkpoints PEFT loads),
resuming (weights equal to an uninterrupted run), `load_best_model_at_end` (the best adapter
restored), and TRL's `SFTTrainer` given the PeftModel or a loracast `LoraConfig`.

Oracles: PEFT 0.21.2 in the same transformers/TRL flow (same files, sizes and outputs; with the
same seed loracast starts from PEFT's initial adapter values, so weights are compared with PEFT's
at 1e-5) and loracast's own uninterrupted run (bit-equal). Tiny Llama, 4 steps, CPU.
"""

from __future__ import annotations

import os

import peft
import pytest
import torch
from safetensors.torch import load_file

import loracast
from loracast.training.trainers import SFTTrainer, Trainer
from tests.support.pipelines import (
    ADAPTER_FILES,
    TARGETS,
    adapted,
    arguments,
    llama,
    lora_values,
    outputs,
    rows,
    sft_args,
    sft_rows,
    word_tokenizer,
)


def test_trainer_given_the_peft_model_keeps_columns_and_writes_peft_checkpoints(tmp_path):
    from transformers import Trainer as TransformersTrainer

    ours, theirs = adapted(loracast), adapted(peft)
    # the column filter of the stock Trainer sees the wrapped model's parameters, as with PEFT
    columns = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        trainer = TransformersTrainer(model=model, args=arguments(tmp_path / f"cols-{name}"), train_dataset=rows())
        trainer._set_signature_columns_if_needed()
        columns[name] = set(trainer._signature_columns)
    assert columns["ours"] - {"adapter_names"} == columns["theirs"]

    Trainer(model=ours, args=arguments(tmp_path / "ours"), train_dataset=rows()).train()
    TransformersTrainer(model=theirs, args=arguments(tmp_path / "theirs"), train_dataset=rows()).train()
    for step in ("checkpoint-2", "checkpoint-4"):
        ours_files = set(os.listdir(tmp_path / "ours" / step))
        theirs_files = set(os.listdir(tmp_path / "theirs" / step))
        assert ours_files >= ADAPTER_FILES and not {"model.safetensors", "pytorch_model.bin"} & ours_files
        assert ours_files - {"generation_config.json"} == theirs_files - {"README.md"}
        ours_file, theirs_file = (tmp_path / side / step / "adapter_model.safetensors" for side in ("ours", "theirs"))
        assert os.path.getsize(ours_file) == os.path.getsize(theirs_file)
        assert load_file(str(ours_file)).keys() == load_file(str(theirs_file)).keys()
    torch.testing.assert_close(lora_values(ours), lora_values(theirs), rtol=0, atol=1e-5)
    ours.eval()
    reloaded = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "ours" / "checkpoint-4")).eval()
    torch.testing.assert_close(outputs(reloaded), outputs(ours), rtol=0, atol=1e-6)


def test_resume_continues_to_the_uninterrupted_weights(tmp_path):
    # the uninterrupted run is given the PeftModel, the resumed one its get_base_model(): both routes
    straight = adapted(loracast)
    Trainer(model=straight, args=arguments(tmp_path / "straight"), train_dataset=rows()).train()
    resumed = adapted(loracast, seed=7)  # as a new process would: other initial values, replaced on resume
    Trainer(model=resumed.get_base_model(), args=arguments(tmp_path / "resumed"), train_dataset=rows()).train(
        resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    expected = lora_values(straight)  # equal to PEFT's uninterrupted run: the first test
    assert all(torch.equal(value, expected[name]) for name, value in lora_values(resumed).items())


def test_stock_trainer_cannot_resume_an_adapter_without_peft_and_ours_can(tmp_path):
    from transformers import Trainer as TransformersTrainer

    model = adapted(loracast).get_base_model()
    TransformersTrainer(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=rows()).train()
    with pytest.raises(ValueError, match="Can't find a checkpoint index"):  # transformers' own limit
        TransformersTrainer(model=model, args=arguments(tmp_path), train_dataset=rows()).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path):
    from transformers import Trainer as TransformersTrainer

    best = {}
    for name, library, trainer_class in (("ours", loracast, Trainer), ("theirs", peft, TransformersTrainer)):
        model = adapted(library)
        model = model if name == "theirs" else model.get_base_model()  # the PeftModel route is the first test's
        args = arguments(tmp_path / name, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                         metric_for_best_model="loss", greater_is_better=True)  # "worst" loss: not the last step
        trainer = trainer_class(model=model, args=args, train_dataset=rows(), eval_dataset=rows(8, seed=3))
        trainer.train()
        best[name] = os.path.basename(trainer.state.best_model_checkpoint)
        saved = load_file(os.path.join(trainer.state.best_model_checkpoint, "adapter_model.safetensors"))
        live = lora_values(model)
        assert all(torch.equal(live[key.replace("base_model.model.", "", 1).replace(".weight", ".default.weight")], value)
                   for key, value in saved.items())
    assert best["ours"] == best["theirs"] == "checkpoint-2"


def test_sft_trainer_trains_and_saves_only_the_adapter(tmp_path):
    from trl import SFTTrainer as TRLSFTTrainer

    sides = {}
    for name, library, trainer_class in (("ours", loracast, SFTTrainer), ("theirs", peft, TRLSFTTrainer)):
        model = adapted(library)
        frozen = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
        args = sft_args(tmp_path / name)
        assert args.bf16 and args.gradient_checkpointing  # TRL's defaults, with its fused LM-head loss
        trainer = trainer_class(model=model, args=args, train_dataset=sft_rows(), processing_class=word_tokenizer())
        trainer.train()
        trainer.save_model(str(tmp_path / name / "final"))
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        sides[name] = model
    assert set(os.listdir(tmp_path / "ours" / "final")) >= ADAPTER_FILES
    assert not {"model.safetensors", "config.json"} & set(os.listdir(tmp_path / "ours" / "final"))
    assert os.path.getsize(tmp_path / "ours" / "final" / "adapter_model.safetensors") == \
        os.path.getsize(tmp_path / "theirs" / "final" / "adapter_model.safetensors")
    ours, theirs = lora_values(sides["ours"]), lora_values(sides["theirs"])
    assert any(not torch.equal(v, lora_values(adapted(loracast))[k]) for k, v in ours.items())  # trained
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)  # bf16 autocast rounds the steps alike: 1e-4
    # (the trained models keep accelerate's autocast forward; compare fresh loads of the saved adapter)
    reloaded = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "ours" / "final")).eval()
    ours_reloaded = loracast.PeftModel.from_pretrained(llama(), tmp_path / "ours" / "final").eval()
    torch.testing.assert_close(lora_values(ours_reloaded), ours, rtol=0, atol=0)
    torch.testing.assert_close(outputs(reloaded), outputs(ours_reloaded), rtol=0, atol=1e-6)


def test_sft_trainer_takes_a_loracast_lora_config(tmp_path):
    from trl import SFTTrainer as TRLSFTTrainer

    config = loracast.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    with pytest.raises(TypeError, match="peft_config"):  # TRL's own check: a peft.PeftConfig only
        TRLSFTTrainer(model=llama(), args=sft_args(tmp_path / "stock", False), train_dataset=sft_rows(),
                      processing_class=word_tokenizer(), peft_config=config)
    model = llama()
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path, False), train_dataset=sft_rows(),
                         processing_class=word_tokenizer(), peft_config=config)
    assert trainer.model is model and model.active_adapters() == ["default"]
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert set(os.listdir(tmp_path / "final")) >= ADAPTER_FILES
    with pytest.raises(loracast.LoracastError, match="pass the PeftModel alone"):
        SFTTrainer(model=adapted(loracast), args=sft_args(tmp_path, False), train_dataset=sft_rows(),
                   processing_class=word_tokenizer(), peft_config=config)
