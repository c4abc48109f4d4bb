"""The settings of a classifier run and their defaults: the one place `loracast train classify`'s
defaults are written (the command line's help and defaults read them from here)."""

from __future__ import annotations

from dataclasses import dataclass

LORA_R = 8
LORA_ALPHA = 16.0
LORA_DROPOUT = 0.0
EVAL_FRACTION = 0.2  # held out when the data has no split column


@dataclass
class ClassifySettings:
    """Optimisation, evaluation and checkpoint settings of one classifier run (transformers' names where it has them)."""

    epochs: float = 1
    max_steps: int | None = None  # None: whole epochs
    lr: float = 3e-3
    batch_size: int = 32  # per process and per accumulated batch
    grad_accum: int = 1
    max_length: int = 64  # tokens per text; longer texts are truncated
    seed: int = 0
    warmup_ratio: float = 0.1  # share of steps (rounded down) with a rising learning rate; step 1 trains at lr / warm-up
    lr_scheduler: str = "linear"  # any of transformers' scheduler names
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping
    evals_per_epoch: int = 4  # evaluations per epoch besides the one before training, unless eval_steps is given
    eval_steps: int | None = None  # evaluate every N steps instead
    save_steps: int | None = None  # checkpoint every N steps
    save_total_limit: int | None = None  # complete checkpoints kept (the best one always)
    load_best: bool = False  # end with the adapter of the best held-out accuracy
    report_to: str = "none"  # transformers' trackers: tensorboard, trackio, wandb, ...
