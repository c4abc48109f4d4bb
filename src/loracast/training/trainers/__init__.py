"""Trainers for loracast models: `Trainer` (transformers', `transformers_trainer`) and `SFTTrainer`
(TRL's, `trl_sft`, needs trl).

Each is the library's own class with `AdapterTrainerMixin` (`adapter_mixin`) first: it takes a
loracast `PeftModel` as ``model``, saves only the adapter in PEFT's format, and resumes from and
restores (``load_best_model_at_end``) adapter checkpoints. Arguments are the library's.
"""

from __future__ import annotations

from typing import Any

from loracast.training.trainers.transformers_trainer import Trainer

__all__ = ["Trainer"]  # and SFTTrainer, resolved by __getattr__ (it needs trl)


def __getattr__(name: str) -> Any:
    if name == "SFTTrainer":  # needs trl, imported only when asked for
        from loracast.training.trainers.trl_sft import SFTTrainer

        return SFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
