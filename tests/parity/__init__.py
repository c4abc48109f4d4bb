"""PEFT parity of the whole stack: the same model through `get_peft_model` in PEFT and in loracast gives the
same outputs, adapter dtypes and initial values. Tests of one module against PEFT as an oracle sit with
that module's tests instead."""
