"""RESULTS.md and results.png from one run's numbers (the dict `run.py` writes to results.json)."""

from __future__ import annotations

import os
import statistics

from targets import evaluate

MIB = 2**20
ROW_LABELS = {"bound": "frozen base (lower bound)", "peft": "PEFT", "exact": "loracast exact (default)",
              "fast": "loracast fast"}


class Results:
    """Lookup over one run: a case's timings, per-round ratios, memory and info."""

    def __init__(self, run: dict) -> None:
        self.run = run
        self.by_case = {r["case"]: r for r in run["results"]}

    def ok(self, case: str) -> dict | None:
        result = self.by_case.get(case)
        return None if result is None or "error" in result or "skipped" in result else result

    def times(self, case: str, row: str, clock: str = "wall") -> list[float] | None:
        """Seconds per call of one row: "wall" time or the process's "cpu" time."""
        result = self.ok(case)
        if result is None or row not in result["rows"]:
            return None
        return result["rows"][row]["times" if clock == "wall" else "cpu"]

    def ratio(self, case: str, row: str, reference: str, clock: str = "cpu") -> list[float] | None:
        """Per-round ratios row / reference (the two ran back to back in each round)."""
        times, ref = self.times(case, row, clock), self.times(case, reference, clock)
        if not times or not ref:
            return None
        return [a / b for a, b in zip(times, ref)]

    def median_ratio(self, case: str, row: str, reference: str, clock: str = "cpu") -> float | None:
        values = self.ratio(case, row, reference, clock)
        return statistics.median(values) if values else None

    def memory(self, case: str, impl: str, row: str) -> int | None:
        result = self.ok(case)
        return (result or {}).get("memory", {}).get(impl, {}).get(row)

    def memory_ratio(self, case: str, row: str) -> float | None:
        ours, theirs = self.memory(case, "loracast", row), self.memory(case, "peft", "peft")
        return ours / theirs if ours and theirs else None

    def info(self, case: str) -> dict:
        result = self.ok(case)
        return result["info"] if result else {}


def _ms(values: list[float] | None) -> str:
    if not values:
        return "n/a"
    return f"{1e3 * statistics.median(values):.1f} ({1e3 * min(values):.1f}-{1e3 * max(values):.1f})"


def _cpu_ms(values: list[float] | None) -> str:
    return f"{1e3 * statistics.median(values):.1f}" if values else "n/a"


def _ratio(values: list[float] | None) -> str:
    if not values:
        return ""
    return f"{statistics.median(values):.3f}x ({min(values):.2f}-{max(values):.2f})"


def _training_table(res: Results, case: str) -> list[str]:
    lines = ["| variant | wall ms, median (min-max) | CPU ms | x frozen base (CPU, per round) | x PEFT (CPU, per "
             "round) | x PEFT (wall, per round) | peak RSS MiB | x PEFT RSS |", "|---|---|---|---|---|---|---|---|"]
    for row, impl in (("bound", None), ("peft", "peft"), ("exact", "loracast"), ("fast", "loracast")):
        if res.times(case, row) is None:
            continue
        ours = impl == "loracast"
        mem = res.memory(case, impl, row) if impl else None
        mem_ratio = res.memory_ratio(case, row) if ours else None
        lines.append("| " + " | ".join([
            ROW_LABELS[row], _ms(res.times(case, row)), _cpu_ms(res.times(case, row, "cpu")),
            _ratio(res.ratio(case, row, "bound")) if row != "bound" else "1",
            _ratio(res.ratio(case, row, "peft")) if ours else "",
            _ratio(res.ratio(case, row, "peft", "wall")) if ours else "",
            "n/a" if impl and mem is None else (f"{mem / MIB:.0f}" if mem else ""),
            f"{mem_ratio:.3f}x" if mem_ratio else ""]) + " |")
    return lines


def _inference_table(res: Results) -> list[str]:
    lines = ["| variant | wall ms, median (min-max) | CPU ms | x base (CPU, per round) | x PEFT (CPU, per round) "
             "| x PEFT (wall, per round) |", "|---|---|---|---|---|---|"]
    rows = (("base", "base model alone", None, None), ("peft", "PEFT unmerged", "base", None),
            ("exact", "loracast exact (default) unmerged", "base", "peft"),
            ("fast", "loracast fast unmerged", "base", "peft"),
            ("base_for_merged", "base model alone (merged rounds)", None, None),
            ("merged_peft", "PEFT merged", "base_for_merged", None),
            ("merged_loracast", "loracast merged", "base_for_merged", "merged_peft"))
    for row, label, base, peft in rows:
        if res.times("infer", row) is None:
            continue
        lines.append("| " + " | ".join([label, _ms(res.times("infer", row)), _cpu_ms(res.times("infer", row, "cpu")),
                                        _ratio(res.ratio("infer", row, base)) if base else "1",
                                        _ratio(res.ratio("infer", row, peft)) if peft else "",
                                        _ratio(res.ratio("infer", row, peft, "wall")) if peft else ""]) + " |")
    return lines


def _injection_table(res: Results) -> list[str]:
    lines = ["| case | targets | PEFT wall ms, median (min-max) | loracast wall ms | loracast / PEFT (CPU, per "
             "round) | loracast / PEFT (wall, per round) |", "|---|---|---|---|---|---|"]
    for case, theirs, ours, label in (("inject_deep", "peft", "loracast", "get_peft_model, deep narrow Llama"),
                                      ("inject_meta", "peft", "loracast", "get_peft_model, 7B shape on meta device"),
                                      ("save_load", "save_peft", "save_loracast", "save_pretrained"),
                                      ("save_load", "load_peft", "load_loracast", "PeftModel.from_pretrained")):
        if res.ok(case) is None:
            continue
        targets = res.info(case).get("targets", "n/a")
        if isinstance(targets, dict):
            targets = targets.get("loracast")
        lines.append(f"| {label} | {targets} | {_ms(res.times(case, theirs))} | {_ms(res.times(case, ours))} | "
                     f"{_ratio(res.ratio(case, ours, theirs))} | {_ratio(res.ratio(case, ours, theirs, 'wall'))} |")
    sizes = res.info("save_load").get("file_bytes")
    if sizes:
        lines.append(f"\nAdapter file: PEFT {sizes['peft']:,} bytes, loracast {sizes['loracast']:,} bytes.")
    return lines


def _merge_table(res: Results) -> list[str]:
    info = res.info("merge")
    lines = [f"Adapters on every linear layer with ||B A scaling|| = {info.get('relative_delta', 0):.0%} of ||W||; "
             "the reference is the float64 sum rounded once to bf16 (nearest-even on the bits).", "",
             "| adapter | library | weights | off a single rounding | changed by merge + unmerge | merge s | "
             "unmerge s | kept for exact unmerge |", "|---|---|---|---|---|---|---|---|"]
    for key in ("bfloat16_adapter", "float32_adapter"):
        for impl in ("peft", "loracast"):
            entry = info.get(impl, {}).get(key)
            if not entry:
                continue
            restore = entry.get("restore_bytes_while_merged")
            restore_text = "nothing (subtracts)" if restore is None else f"{restore / MIB:.1f} MiB"
            lines.append(f"| {key.split('_')[0]} | {impl} | {entry['weights']:,} | {entry['off_single_rounding']:,} | "
                         f"{entry['unmerge_changed']:,} | {entry['merge_s']:.2f} | {entry['unmerge_s']:.2f} | "
                         f"{restore_text} |")
    return lines


def _machine_lines(run: dict) -> list[str]:
    m = run["machine"]
    loads = [run.get("load_before"), run.get("load_after")]
    load_text = " / ".join("n/a" if load is None else ", ".join(f"{v:.1f}" for v in load) for load in loads)
    return [
        f"- Date: {run['date']}; command: `{run['command']}`; sizes: {run['size']}; wall time {run['wall_s']:.0f} s.",
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['cpu_capability']}), {m['memory_gib']} GiB; torch threads "
        f"per worker: {m['torch_threads']}; {m['platform']}.",
        f"- Versions: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
        f"bitsandbytes {m['bitsandbytes']}, loracast {m['loracast']} ({m['loracast_commit']}).",
        f"- Load average (1, 5, 15 min) before / after: {load_text}. The cores are shared with other work, so both "
        "libraries run in the same process, interleaved round by round, and ratios are taken per round; every "
        "figure is a median with its min-max. Ratios use the process's CPU time (with one torch thread, the work a "
        "call does; wall time adds waiting for a shared core); wall-time ratios are given beside them.",
    ]


SECTIONS = (
    ("train_bf16_fp32", "Training step: bf16 base, fp32 adapters (PEFT's default)", "train"),
    ("train_bf16_bf16", "Training step: bf16 base, bf16 adapters", "train"),
    ("train_fp32_fp32", "Training step: fp32 base, fp32 adapters", "train"),
    ("qlora", "Training step: 4-bit base (bitsandbytes nf4, bf16 compute), fp32 adapters", "train"),
    ("infer", "Inference latency: bf16 base, fp32 adapters, one sequence", "infer"),
    ("merge", "Merge precision (bf16 base)", "merge"),
    ("inject_deep", "Injection, saving and loading", "inject"),
)


def _section(res: Results, case: str, kind: str) -> list[str]:
    result = res.by_case[case]
    if "skipped" in result or "error" in result:
        return [f"Not measured: {(result.get('skipped') or result['error']).splitlines()[-1]}"]
    if kind == "train":
        info = res.info(case)
        return [f"{info['tokens']} tokens per step, AdamW over the adapter parameters. The bound is the frozen "
                "base's forward plus a backward to its inputs only. Peak RSS: the whole process (base weights "
                "included) during one step, each library alone in a fresh process.", ""] + _training_table(res, case)
    return {"infer": _inference_table, "merge": _merge_table}[kind](res)


def write_report(run: dict, out: str) -> str:
    """Write RESULTS.md (and results.png when matplotlib is installed) into `out`; returns the .md path."""
    res = Results(run)
    lines = ["# loracast vs PEFT: benchmark results", "",
             "Written by `make bench` (`benchmarks/run.py`); every number below comes from the one run described "
             "here. Lower is better everywhere; `x PEFT` below 1 means loracast is faster or smaller.", ""]
    lines += _machine_lines(run)
    lines += ["", "## Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for name, goal, measured, met in evaluate(res):
        lines.append(f"| {name} | {goal} | {measured} | {'yes' if met else ('-' if met is None else '**no**')} |")
    for case, title, kind in SECTIONS:
        if kind == "inject" and any(c in res.by_case for c in ("inject_deep", "inject_meta", "save_load")):
            lines += ["", f"## {title}", ""] + _injection_table(res)
        elif case in res.by_case:
            lines += ["", f"## {title}", ""] + _section(res, case, kind)
    failed = [r for r in run["results"] if "error" in r or r.get("memory_errors")]
    if failed:
        lines += ["", "## Failed workers", ""]
        for r in failed:
            errors = [r["error"]] if "error" in r else list(r["memory_errors"].values())
            lines += [f"- {r['case']}: `{e.strip().splitlines()[-1]}`" for e in errors]
    if os.path.abspath(out) == os.path.dirname(os.path.abspath(__file__)):
        lines += ["", "## Profiles and notes", "", "What bounds each figure, with profiles: [NOTES.md](NOTES.md)."]
    chart = write_chart(res, out)
    if chart:
        lines += ["", f"![loracast vs PEFT]({os.path.basename(chart)})"]
    path = os.path.join(out, "RESULTS.md")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def write_chart(res: Results, out: str) -> str | None:
    """results.png: loracast / PEFT per measure, and training steps against the frozen base."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    bars = []
    for label, case, row, ref in (
            ("step bf16+fp32, fast", "train_bf16_fp32", "fast", "peft"),
            ("step bf16+fp32, exact", "train_bf16_fp32", "exact", "peft"),
            ("step bf16+bf16, exact", "train_bf16_bf16", "exact", "peft"),
            ("step fp32, exact", "train_fp32_fp32", "exact", "peft"),
            ("step 4-bit, fast", "qlora", "fast", "peft"),
            ("step 4-bit, exact", "qlora", "exact", "peft"),
            ("inference unmerged, fast", "infer", "fast", "peft"),
            ("inference unmerged, exact", "infer", "exact", "peft"),
            ("inject, deep model", "inject_deep", "loracast", "peft"),
            ("inject, 7B on meta", "inject_meta", "loracast", "peft"),
            ("save_pretrained", "save_load", "save_loracast", "save_peft"),
            ("from_pretrained", "save_load", "load_loracast", "load_peft")):
        value = res.median_ratio(case, row, ref)
        if value is not None:
            bars.append((label, value))
    groups = [case for case in ("train_bf16_fp32", "train_bf16_bf16", "train_fp32_fp32", "qlora")
              if res.ok(case)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    if bars:
        labels, values = zip(*bars)
        left.barh(labels, values, color=["#2a7" if v <= 1 else "#c44" for v in values])
        left.axvline(1.0, color="black", lw=1)
        left.set_xscale("log")
        left.set_xlabel("loracast / PEFT, CPU time, per-round median (log; < 1 is faster)")
        left.invert_yaxis()
    width = 0.27
    for offset, row, color in ((0, "peft", "#888"), (1, "exact", "#48c"), (2, "fast", "#2a7")):
        xs, ys = [], []
        for index, case in enumerate(groups):
            value = res.median_ratio(case, row, "bound")
            if value is not None:
                xs.append(index + (offset - 1) * width)
                ys.append(value)
        right.bar(xs, ys, width, label=ROW_LABELS[row], color=color)
    right.axhline(1.0, color="black", lw=1)
    right.set_xticks(range(len(groups)), [g.replace("train_", "").replace("_", " + ") for g in groups])
    right.set_ylabel("training step / frozen-base bound, CPU time, per-round median")
    right.set_ylim(bottom=0.9)
    right.legend()
    fig.tight_layout()
    path = os.path.join(out, "results.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
