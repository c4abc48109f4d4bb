"""TRL's `SFTTrainer` for loracast models (needs the ``trl`` package).

TRL recognises an adapter model only as a ``peft.PeftModel``, and accepts only a
``peft.PeftConfig`` as ``peft_config=``. Given a loracast `PeftModel` it patches the wrapper as
if it were the transformers model and fails at the first step; given a loracast `LoraConfig` it
raises a TypeError. This class takes both: the config is applied with loracast's
`get_peft_model` before TRL sees the model, and TRL is handed the adapted `PreTrainedModel`
(`AdapterTrainerMixin`), which it patches and trains as it does the model inside a PEFT wrapper.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from trl import SFTTrainer as _TRLSFTTrainer

from loracast.config import LoraConfig
from loracast.errors import LoracastError
from loracast.training.trainers.adapter_mixin import AdapterTrainerMixin
from loracast.tuner.peft_model import PeftModel, get_peft_model


def apply_lora_config(model: Any, peft_config: Any) -> tuple[Any, Any]:
    """(model, peft_config) for TRL: a loracast `peft_config` is applied to `model` here and
    replaced by None; anything else is passed on unchanged.

    Raises:
        LoracastError: a loracast config with a model that already has adapters, or with a model
            given by name (load it first, so that loracast adapts the loaded model).
    """
    if not isinstance(peft_config, LoraConfig):
        return model, peft_config
    if isinstance(model, PeftModel):
        raise LoracastError("SFTTrainer got a loracast PeftModel and a peft_config: the model has its adapters "
                            "already; pass the PeftModel alone, or the base model with peft_config=LoraConfig(...)")
    if not isinstance(model, nn.Module):
        raise LoracastError(f"SFTTrainer got model={model!r} with a loracast peft_config: load the model first "
                            "(model = AutoModelForCausalLM.from_pretrained(...)) and pass it as model=, so that "
                            "loracast adapts the loaded model")
    return get_peft_model(model, peft_config), None


class SFTTrainer(AdapterTrainerMixin, _TRLSFTTrainer):
    """TRL's `SFTTrainer`; ``model`` may be a loracast `PeftModel`, and ``peft_config`` a loracast
    `LoraConfig`. Other arguments are TRL's."""

    def __init__(self, model: Any, *args: Any, peft_config: Any = None, **kwargs: Any) -> None:
        model, peft_config = apply_lora_config(model, peft_config)
        super().__init__(model, *args, peft_config=peft_config, **kwargs)
