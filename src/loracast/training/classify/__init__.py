"""The classifier job of `loracast train` on transformers' `Trainer`: `data` (CSV/JSONL text/label
files, labels, splits), `settings` (the job's defaults), `model` (the base classifier with its head
and adapter), `evaluate` (held-out accuracy and loss), `engine` (the trainer subclass: the float32
loss, the seeded batch order, the evaluations and the per-step record), `metrics` (what a run
measured, typed), `run` (a whole run and its files), `console` (text summaries)."""
