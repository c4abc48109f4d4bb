"""transformers' `Trainer` for loracast models."""

from __future__ import annotations

from transformers import Trainer as _TransformersTrainer

from loracast.training.trainers.adapter_mixin import AdapterTrainerMixin


class Trainer(AdapterTrainerMixin, _TransformersTrainer):
    """transformers' `Trainer`, which also resumes from and restores loracast adapter checkpoints
    and takes a loracast `PeftModel` as ``model``; arguments are `transformers.Trainer`'s."""
