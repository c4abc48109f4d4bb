"""The issue's targets, each read from one run's results (`report.Results`)."""

from __future__ import annotations

import statistics
from typing import Callable, Iterator

MIB = 2**20


def _median(values):
    return statistics.median(values) if values else None


def _fmt(value, unit="x"):
    return "n/a" if value is None else f"{value:.3f}{unit}"


def _at_most(limit: float):
    return lambda value: None if value is None else value <= limit


# (name, goal text, measured value from Results, check)
TARGETS: list[tuple[str, str, Callable, Callable]] = [
    ("step bf16 base + fp32 adapters, fast, vs frozen base", "<= 1.10x",
     lambda r: _median(r.vs_bound("train_bf16_fp32", "loracast", "fast")), _at_most(1.10)),
    ("step bf16 base + fp32 adapters, fast, vs PEFT", "<= 0.80x",
     lambda r: r.vs_peft("train_bf16_fp32", "fast"), _at_most(0.80)),
    ("step bf16 base + fp32 adapters, exact (default), vs PEFT", "(no target; < 1 is faster)",
     lambda r: r.vs_peft("train_bf16_fp32", "exact"), lambda v: None),
    ("step bf16 base + bf16 adapters, exact (default), vs frozen base", "<= 1.05x",
     lambda r: _median(r.vs_bound("train_bf16_bf16", "loracast", "exact")), _at_most(1.05)),
    ("step bf16 base + bf16 adapters, fast, vs frozen base", "<= 1.05x",
     lambda r: _median(r.vs_bound("train_bf16_bf16", "loracast", "fast")), _at_most(1.05)),
    ("step peak RSS bf16 + fp32, exact, vs PEFT", "<= 1.00x",
     lambda r: _mem_ratio(r, "train_bf16_fp32", "exact"), _at_most(1.0)),
    ("step peak RSS bf16 + fp32, fast, vs PEFT", "<= 1.00x",
     lambda r: _mem_ratio(r, "train_bf16_fp32", "fast"), _at_most(1.0)),
    ("unmerged inference, exact (default), vs base", "<= 1.15x",
     lambda r: _median(r.vs_bound("infer", "loracast", "exact", "base")), _at_most(1.15)),
    ("unmerged inference, fast, vs base", "<= 1.15x",
     lambda r: _median(r.vs_bound("infer", "loracast", "fast", "base")), _at_most(1.15)),
    ("injection, deep model, vs PEFT", "<= 0.05x",
     lambda r: r.vs_peft("inject_deep", "inject", "inject"), _at_most(0.05)),
    ("injection, 7B shape on meta, vs PEFT", "<= 0.05x",
     lambda r: r.vs_peft("inject_meta", "inject", "inject"), _at_most(0.05)),
    ("from_pretrained, 336-module adapter, vs PEFT", "<= 0.25x",
     lambda r: r.vs_peft("save_load", "load", "load"), _at_most(0.25)),
    ("merge: elements off a single rounding (bf16 / fp32 adapters)", "0",
     lambda r: _merge(r, "off_single_rounding"), lambda v: None if v is None else v == (0, 0)),
    ("unmerge: elements changed (bf16 / fp32 adapters)", "0",
     lambda r: _merge(r, "unmerge_changed"), lambda v: None if v is None else v == (0, 0)),
    ("4-bit step, fast, vs PEFT", "<= 1.00x", lambda r: r.vs_peft("qlora", "fast"), _at_most(1.0)),
    ("4-bit step, exact (default), vs PEFT", "<= 1.00x", lambda r: r.vs_peft("qlora", "exact"), _at_most(1.0)),
    ("4-bit step peak RSS, fast, vs PEFT", "<= 1.00x", lambda r: _mem_ratio(r, "qlora", "fast"), _at_most(1.0)),
    ("4-bit step peak RSS, exact, vs PEFT", "<= 1.00x", lambda r: _mem_ratio(r, "qlora", "exact"), _at_most(1.0)),
]


def _mem_ratio(res, case: str, row: str):
    ours, theirs = res.memory(case, "loracast", row), res.memory(case, "peft", "peft")
    return ours / theirs if ours and theirs else None


def _merge(res, field: str):
    info = res.info("merge", "loracast")
    if not info:
        return None
    return tuple(info[key][field] for key in ("bfloat16_adapter", "float32_adapter"))


def evaluate(res) -> Iterator[tuple[str, str, str, bool | None]]:
    """(name, goal, measured text, met: True / False / None when not measured or no goal)."""
    for name, goal, measure, check in TARGETS:
        value = measure(res)
        if isinstance(value, tuple):
            text = " / ".join(f"{v:,}" for v in value)
        else:
            text = _fmt(value)
        yield name, goal, text, check(value)
