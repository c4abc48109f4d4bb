"""LoRA fine-tuning runs for text classification, as `loracast train` performs them.

Modules, one job each: `data` (files, labels, splits), `setup` (model, tokenizer, adapter),
`policy` (precision policy names), `loop` (optimisation and evaluation), `runtime` (device and
process placement), `report` (dtypes, memory, time), `plot` (PNG curves), `run` (a whole run and
the policy comparison, writing files), `console` (text summaries). And `trainers`:
transformers' `Trainer` and TRL's `SFTTrainer` for loracast models (`adapter_trainer`, `sft_trainer`).
"""
