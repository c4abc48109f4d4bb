"""What transformers' trainers need to train loracast models (`trainers.Trainer`, `trainers.SFTTrainer`).

transformers treats a model as an adapter model in two ways. A `PreTrainedModel` carrying its
PEFT-integration attributes (loracast installs them: `integrations/transformers.py`) trains and
saves only the adapter, in PEFT's format. But resuming and restoring the best checkpoint go
through ``isinstance(model, peft.PeftModel)`` alone: for any other model `Trainer` looks for full
weights (``model.safetensors``) and fails on an adapter checkpoint ("Can't find a checkpoint
index", or "checkpoint-N/pytorch_model.bin" not found). And a wrapper that is neither (such as
`loracast.PeftModel`) is saved as its whole state dict. No attribute of the model changes that,
so loracast subclasses the trainer:

- the loracast `PeftModel` passed as ``model`` is replaced by the adapted `PreTrainedModel` inside
  it (``peft_model.get_base_model()``: the same parameters), so saving writes the adapter only,
  TRL patches the transformers model as it does under PEFT, and quantized bases train;
- an adapter checkpoint (``adapter_model.safetensors``, no full weights) is loaded into the
  active adapter in place when resuming and for ``load_best_model_at_end``.

Everything else is the trainer's own code; nothing of transformers, TRL or PEFT is patched.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from loracast.files.format import WEIGHTS_NAME
from loracast.integrations.transformers import installed_peft_model
from loracast.tuner.peft_model import PeftModel

# full-weights files: when a checkpoint holds one of these, the trainer's own loader is right
_FULL_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")


def unwrap_for_trainer(model: Any) -> Any:
    """The model to hand to a transformers trainer: a loracast `PeftModel`'s adapted
    `PreTrainedModel`; anything else (a `PeftModel` over a plain torch module included) unchanged."""
    if isinstance(model, PeftModel) and installed_peft_model(model.get_base_model()) is model:
        return model.get_base_model()
    return model


def is_adapter_checkpoint(folder: str) -> bool:
    """True when `folder` holds an adapter file and no full weights."""
    return os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) and not any(
        os.path.isfile(os.path.join(folder, name)) for name in _FULL_WEIGHTS)


def load_adapter_checkpoint(model: nn.Module, folder: str) -> bool:
    """Load an adapter checkpoint into `model`'s active loracast adapter, in place.

    Returns False (and loads nothing) when `model` carries no loracast adapter or `folder` is not
    an adapter checkpoint, so the trainer's own loader handles it.
    """
    peft_model = installed_peft_model(model)
    if peft_model is None or not is_adapter_checkpoint(folder):
        return False
    peft_model.load_adapter(folder, peft_model.active_adapters[0], is_trainable=True)
    return True


class AdapterTrainerMixin:
    """Put before a transformers `Trainer` class (``class T(AdapterTrainerMixin, Trainer)``) to
    train loracast models with it: see the module docstring."""

    def __init__(self, model: Any = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(unwrap_for_trainer(model), *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not load_adapter_checkpoint(self.model if model is None else model, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not load_adapter_checkpoint(self.model, self.state.best_model_checkpoint):
            super()._load_best_model()
