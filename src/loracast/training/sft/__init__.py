"""The SFT job of `loracast train` on transformers' `Trainer`: `batches` (the length-grouped batch
sampler and the padding collator), `engine` (the trainer subclass: the assistant-token loss, the
held-out evaluation, the per-step record and the progress bar), and `data`, `template`,
`model`, `packing`, `loss`, `evaluate`, `settings`, `run`, `console`; checkpoints and the progress
bar are shared with the classifier (`training.common`)."""
