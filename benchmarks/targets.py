"""The issue's targets, each read from one run's results (`report.Results`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator


def _fmt(value, unit="x"):
    return "n/a" if value is None else f"{value:.3f}{unit}"


def _at_most(limit: float):
    return lambda value: None if value is None else value <= limit


def _vs_bound(case: str, row: str):
    return lambda r: r.median_ratio(case, row, "bound")


def _vs_peft(case: str, row: str, reference: str = "peft"):
    return lambda r: r.median_ratio(case, row, reference)


def _memory(case: str, row: str):
    return lambda r: r.memory_ratio(case, row)


def _merge(field: str):
    def measure(res):
        info = res.info("merge").get("loracast")
        if not info:
            return None
        return tuple(info[key][field] for key in ("bfloat16_adapter", "float32_adapter"))
    return measure


_ZERO = lambda v: None if v is None else v == (0, 0)  # noqa: E731
_NO_GOAL = lambda v: None  # noqa: E731

# (name, goal text, measure(Results) -> value, check(value) -> True / False / None)
TARGETS: list[tuple[str, str, Callable, Callable]] = [
    ("step, bf16 base + fp32 adapters, fast, vs frozen base", "<= 1.10x", _vs_bound("train_bf16_fp32", "fast"),
     _at_most(1.10)),
    ("step, bf16 base + fp32 adapters, fast, vs PEFT", "<= 0.80x", _vs_peft("train_bf16_fp32", "fast"), _at_most(0.80)),
    ("step, bf16 base + fp32 adapters, exact (default), vs PEFT", "no goal", _vs_peft("train_bf16_fp32", "exact"),
     _NO_GOAL),
    ("step, bf16 base + bf16 adapters, exact (default), vs frozen base", "<= 1.05x",
     _vs_bound("train_bf16_bf16", "exact"), _at_most(1.05)),
    ("step, bf16 base + bf16 adapters, fast, vs frozen base", "<= 1.05x", _vs_bound("train_bf16_bf16", "fast"),
     _at_most(1.05)),
    ("step peak RSS, bf16 + fp32, exact, vs PEFT", "<= 1.00x", _memory("train_bf16_fp32", "exact"), _at_most(1.0)),
    ("step peak RSS, bf16 + fp32, fast, vs PEFT", "<= 1.00x", _memory("train_bf16_fp32", "fast"), _at_most(1.0)),
    ("unmerged inference, exact (default), vs base", "<= 1.15x", lambda r: r.median_ratio("infer", "exact", "base"),
     _at_most(1.15)),
    ("unmerged inference, fast, vs base", "<= 1.15x", lambda r: r.median_ratio("infer", "fast", "base"),
     _at_most(1.15)),
    ("injection, deep model, vs PEFT", "<= 0.05x", _vs_peft("inject_deep", "loracast"), _at_most(0.05)),
    ("injection, 7B shape on meta, vs PEFT", "<= 0.05x", _vs_peft("inject_meta", "loracast"), _at_most(0.05)),
    ("from_pretrained, 336-module adapter, vs PEFT", "<= 0.25x", _vs_peft("save_load", "load_loracast", "load_peft"),
     _at_most(0.25)),
    ("merge: elements off a single rounding (bf16 / fp32 adapters)", "0", _merge("off_single_rounding"), _ZERO),
    ("unmerge: elements changed (bf16 / fp32 adapters)", "0", _merge("unmerge_changed"), _ZERO),
    ("4-bit step, fast, vs PEFT", "<= 1.00x", _vs_peft("qlora", "fast"), _at_most(1.0)),
    ("4-bit step, exact (default), vs PEFT", "<= 1.00x", _vs_peft("qlora", "exact"), _at_most(1.0)),
    ("4-bit step peak RSS, fast, vs PEFT", "<= 1.00x", _memory("qlora", "fast"), _at_most(1.0)),
    ("4-bit step peak RSS, exact, vs PEFT", "<= 1.00x", _memory("qlora", "exact"), _at_most(1.0)),
]


class _WallClock:
    """`Results` seen through wall time: the same measures, ratios of wall seconds."""

    def __init__(self, res) -> None:
        self.res = res

    def median_ratio(self, case, row, reference, clock="cpu"):
        return self.res.median_ratio(case, row, reference, "wall")

    def __getattr__(self, name):
        return getattr(self.res, name)


def evaluate(res) -> Iterator[tuple[str, str, str, bool | None]]:
    """(name, goal, measured text, met: True / False / None when not measured or no goal).

    Time ratios are judged on CPU time; the wall-time ratio is shown in brackets."""
    for name, goal, measure, check in TARGETS:
        value = measure(res)
        if isinstance(value, tuple):
            text = " / ".join(f"{v:,}" for v in value)
        else:
            text = _fmt(value)
            wall = measure(_WallClock(res))
            if wall is not None and value is not None and wall != value:
                text += f" (wall {_fmt(wall)})"
        yield name, goal, text, check(value)
