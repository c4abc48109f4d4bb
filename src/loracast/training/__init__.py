"""LoRA fine-tuning runs as `loracast train` performs them: a text classifier on labelled texts,
or supervised fine-tuning (SFT) of a causal LM on chat data.

Modules, one job each. Shared: `runtime` (device and process placement), `policy` (precision
policy names), `progress` (the progress bar), `report` (dtypes, memory, time), `plot` (PNG curves).
Classifier: `data` (files, labels, splits), `setup` (model, tokenizer, adapter), `loop`
(optimisation and evaluation), `run` (a whole run and the policy comparison), `console` (text
summaries). SFT: `chat_data` (messages and prompt/completion files), `chat_template` (rendering
and assistant-only labels), `lm_batching` (length-grouped batches, padding), `lm_setup` (causal
LM from a folder or GGUF, adapter), `lm_loss` (the loss on assistant tokens, projecting only
the labelled positions), `lm_eval` (greedy answers, exact score, held-out loss), `lm_loop`
(optimisation), `lm_run` (a whole run, its files, the policy comparison), `lm_console` (text
summaries).
And `trainers`: transformers' `Trainer` and TRL's `SFTTrainer` for loracast models.
"""
