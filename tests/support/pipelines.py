"""Helpers for the trainer pipeline tests: a tiny Llama, its data, trainer arguments, a tokenizer
built in memory. No import of peft here: tests/integrations/test_trainer_without_peft.py uses these in a
process where peft cannot be imported."""

from __future__ import annotations

import torch

from tests.support.models import tiny_llama_config

TARGETS = ["q_proj", "v_proj"]
ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json"}


def llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def adapted(library, seed: int = 1):
    torch.manual_seed(seed)
    return library.get_peft_model(llama(), library.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))


def rows(count: int = 32, seed: int = 0):
    """A datasets.Dataset with the model's columns and one it does not take ('source')."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (count, 10), generator=generator)
    ids[:, 1::2] = (ids[:, 0::2] * 7) % 125 + 3  # learnable: every second token follows from the one before
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(), "source": ["synthetic"] * count})


def arguments(out, **overrides):
    from transformers import TrainingArguments

    values = dict(output_dir=str(out), use_cpu=True, max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                  report_to=[], save_strategy="steps", save_steps=2, logging_strategy="no", disable_tqdm=True,
                  seed=0)
    values.update(overrides)
    return TrainingArguments(**values)


def lora_values(model) -> dict[str, torch.Tensor]:
    return {n.replace("base_model.model.", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(rows(2, seed=5)["input_ids"])).logits


def word_tokenizer():
    """A tokenizer over the tiny Llama's 128 ids, built in memory (no hub)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def sft_rows():
    from datasets import Dataset

    return Dataset.from_dict({"text": [" ".join(f"w{t}" for t in row) for row in rows(16)["input_ids"]]})


def sft_args(out, defaults: bool = True, max_steps: int = 2):
    from trl import SFTConfig

    values = dict(output_dir=str(out), use_cpu=True, max_steps=max_steps, per_device_train_batch_size=8, report_to=[],
                  save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, learning_rate=1e-2)
    if not defaults:  # TRL's defaults: bf16 autocast, gradient checkpointing
        values.update(bf16=False, gradient_checkpointing=False)
    return SFTConfig(**values)
