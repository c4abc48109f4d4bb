"""Trainers for loracast models: `Trainer` (transformers') and `SFTTrainer` (TRL's, needs trl).

Each is the library's own class with `AdapterTrainerMixin` (adapter_trainer.py) first: it takes a
loracast `PeftModel` as ``model``, saves only the adapter in PEFT's format, and resumes from and
restores (``load_best_model_at_end``) adapter checkpoints. Arguments are the library's.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer as _TransformersTrainer

from loracast.training.adapter_trainer import AdapterTrainerMixin

__all__ = ["Trainer"]  # and SFTTrainer, resolved by __getattr__ (it needs trl)


class Trainer(AdapterTrainerMixin, _TransformersTrainer):
    """transformers' `Trainer`, which also resumes from and restores loracast adapter checkpoints
    and takes a loracast `PeftModel` as ``model``; arguments are `transformers.Trainer`'s."""


def __getattr__(name: str) -> Any:
    if name == "SFTTrainer":  # needs trl, imported only when asked for
        from loracast.training.sft_trainer import SFTTrainer

        return SFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
