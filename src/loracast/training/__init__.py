"""The `loracast train` application: supervised fine-tuning (SFT) of a causal LM on chat data, and
a text classifier on labelled texts.

`sft/` is the SFT job on transformers' `Trainer`: `data` (instruction files and folders in TRL's
formats), `template` (chat-template rendering and assistant-only labels), `model` (the causal LM
from a folder or GGUF, with its adapter), `batches` (length-grouped batches, padding), `packing`,
`loss` (the loss on assistant tokens, projecting only the labelled positions), `evaluate` (greedy
answers, exact score), `engine` (the trainer subclass), `checkpoints`, `run` (a whole run and its
files), `console` (text summaries).
The classifier, flat here: `data` (files, labels, splits), `setup` (model, tokenizer, adapter),
`loop` (optimisation and evaluation, DDP through `runtime`/`ddp_runtime`), `run`, `console`.
Shared: `policy` (precision policy names), `progress` (the classifier's progress bar), `report`
(dtypes, memory, time), `plot` (PNG curves).
And `trainers`: transformers' `Trainer` and TRL's `SFTTrainer` for loracast models.
"""
