"""The `loracast train` application: supervised fine-tuning (SFT) of a causal LM on chat data, and
a text classifier on labelled texts, both on transformers' `Trainer`.

One package per job with the same module names: `sft/` and `classify/` (data, model, evaluate,
engine, settings, run, console; plus the SFT job's template, batches, packing and loss, and the
classifier's typed metrics). `common/` holds what both share (errors, data checks, adapter and
4-bit set-up, policies, device, history, checkpoints, progress, report, plot, files, console), and
`trainers/` transformers' `Trainer` and TRL's `SFTTrainer` for loracast models.
"""
