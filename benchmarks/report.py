"""RESULTS.md and results.png from one run's numbers (the dict `run.py` writes to results.json)."""

from __future__ import annotations

import os
import statistics

from targets import TARGETS, evaluate

MIB = 2**20


class Results:
    """Lookup over one run: the result of (case, impl) and the derived figures."""

    def __init__(self, run: dict) -> None:
        self.run = run
        self.by_key = {(r["case"], r["impl"]): r for r in run["results"]}

    def get(self, case: str, impl: str) -> dict | None:
        result = self.by_key.get((case, impl))
        return None if result is None or "error" in result or "skipped" in result else result

    def times(self, case: str, impl: str, row: str) -> list[float] | None:
        result = self.get(case, impl)
        if result is None or row not in result["rows"]:
            return None
        return result["rows"][row]["times"]

    def median(self, case: str, impl: str, row: str) -> float | None:
        times = self.times(case, impl, row)
        return statistics.median(times) if times else None

    def vs_bound(self, case: str, impl: str, row: str, bound: str = "bound") -> list[float] | None:
        """Per-round ratios row / bound, measured interleaved in one process."""
        times, base = self.times(case, impl, row), self.times(case, impl, bound)
        if not times or not base:
            return None
        return [a / b for a, b in zip(times, base)]

    def vs_peft(self, case: str, row: str, peft_row: str = "peft") -> float | None:
        """Median loracast time / median PEFT time (two processes)."""
        ours, theirs = self.median(case, "loracast", row), self.median(case, "peft", peft_row)
        return ours / theirs if ours and theirs else None

    def vs_peft_normalised(self, case: str, row: str, bound: str = "bound") -> float | None:
        """(loracast / its bound) / (PEFT / its bound): the cross-process ratio with each process's load divided out."""
        ours, theirs = self.vs_bound(case, "loracast", row, bound), self.vs_bound(case, "peft", "peft", bound)
        return statistics.median(ours) / statistics.median(theirs) if ours and theirs else None

    def memory(self, case: str, impl: str, row: str) -> int | None:
        result = self.get(case, impl)
        if result is None or row not in result["rows"]:
            return None
        return result["rows"][row].get("peak_rss")

    def info(self, case: str, impl: str) -> dict:
        result = self.get(case, impl)
        return result["info"] if result else {}


def _ms(values: list[float] | None) -> str:
    if not values:
        return "n/a"
    return f"{1e3 * statistics.median(values):.1f} ({1e3 * min(values):.1f}-{1e3 * max(values):.1f})"


def _ratio(values: list[float] | float | None) -> str:
    if values is None:
        return "n/a"
    if isinstance(values, float):
        return f"{values:.2f}x"
    return f"{statistics.median(values):.3f}x ({min(values):.2f}-{max(values):.2f})"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.0f}"


ROW_LABELS = {"bound": "frozen base (bound)", "peft": "PEFT", "exact": "loracast exact (default)",
              "fast": "loracast fast"}


def _training_table(res: Results, case: str) -> list[str]:
    lines = ["| variant | step ms, median (min-max) | x frozen base, per round | x PEFT | x PEFT, each / own bound "
             "| peak RSS MiB | x PEFT RSS |", "|---|---|---|---|---|---|---|"]
    peft_mem = res.memory(case, "peft", "peft")
    for impl, row in (("peft", "bound"), ("peft", "peft"), ("loracast", "bound"), ("loracast", "exact"),
                      ("loracast", "fast")):
        if res.times(case, impl, row) is None:
            continue
        label = ROW_LABELS[row] + (f" ({impl} process)" if row == "bound" else "")
        is_ours = impl == "loracast" and row != "bound"
        mem = res.memory(case, impl, row)
        lines.append("| " + " | ".join([
            label, _ms(res.times(case, impl, row)),
            _ratio(res.vs_bound(case, impl, row)) if row != "bound" else "1",
            _ratio(res.vs_peft(case, row)) if is_ours else "",
            _ratio(res.vs_peft_normalised(case, row)) if is_ours else "",
            _mib(mem) if row != "bound" else "",
            _ratio(mem / peft_mem) if is_ours and mem and peft_mem else ""]) + " |")
    return lines


def _injection_table(res: Results) -> list[str]:
    lines = ["| case | targets | PEFT ms | loracast ms | loracast / PEFT |", "|---|---|---|---|---|"]
    for case, row, label in (("inject_deep", "inject", "get_peft_model, deep narrow Llama"),
                             ("inject_meta", "inject", "get_peft_model, 7B shape on meta device"),
                             ("save_load", "save", "save_pretrained"),
                             ("save_load", "load", "PeftModel.from_pretrained")):
        targets = res.info(case, "loracast").get("targets", "n/a")
        lines.append(f"| {label} | {targets} | {_ms(res.times(case, 'peft', row))} | "
                     f"{_ms(res.times(case, 'loracast', row))} | {_ratio(res.vs_peft(case, row, row))} |")
    sizes = [res.info("save_load", impl).get("file_bytes") for impl in ("peft", "loracast")]
    if all(sizes):
        lines.append(f"\nAdapter file: PEFT {sizes[0]:,} bytes, loracast {sizes[1]:,} bytes.")
    return lines


def _inference_table(res: Results) -> list[str]:
    lines = ["| variant | forward ms, median (min-max) | x base, per round | x PEFT |", "|---|---|---|---|"]
    for impl, row in (("peft", "base"), ("peft", "peft"), ("peft", "merged"), ("loracast", "base"),
                      ("loracast", "exact"), ("loracast", "fast"), ("loracast", "merged")):
        if res.times("infer", impl, row) is None:
            continue
        bound = "base_for_merged" if row == "merged" else "base"
        labels = {"base": f"base model alone ({impl} process)", "merged": f"{impl} merged"}
        label = labels[row] if row in labels else ROW_LABELS[row] + " unmerged"
        ours = impl == "loracast" and row != "base"
        lines.append("| " + " | ".join([
            label, _ms(res.times("infer", impl, row)),
            _ratio(res.vs_bound("infer", impl, row, bound)) if row != "base" else "1",
            _ratio(res.vs_peft("infer", row, "merged" if row == "merged" else "peft")) if ours else ""]) + " |")
    return lines


def _merge_table(res: Results) -> list[str]:
    lines = ["| adapter | library | weights | off a single rounding | changed by merge + unmerge | merge s | "
             "unmerge s | restore memory while merged |", "|---|---|---|---|---|---|---|---|"]
    for key in ("bfloat16_adapter", "float32_adapter"):
        for impl in ("peft", "loracast"):
            entry = res.info("merge", impl).get(key)
            if not entry:
                continue
            restore = entry.get("restore_bytes_while_merged")
            restore_text = "none (subtracts)" if restore is None else f"{restore / MIB:.1f} MiB"
            lines.append(f"| {key.split('_')[0]} | {impl} | {entry['weights']:,} | {entry['off_single_rounding']:,} | "
                         f"{entry['unmerge_changed']:,} | {entry['merge_s']:.2f} | {entry['unmerge_s']:.2f} | "
                         f"{restore_text} |")
    return lines


def _machine_lines(run: dict) -> list[str]:
    m = run["machine"]
    load = run.get("load_before"), run.get("load_after")
    load_text = " / ".join("n/a" if l is None else ", ".join(f"{v:.1f}" for v in l) for l in load)
    return [
        f"- Date: {run['date']}; command: `{run['command']}`; sizes: {run['size']}; wall time {run['wall_s']:.0f} s.",
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['cpu_capability']}), {m['memory_gib']} GiB; torch threads "
        f"per worker: {m['torch_threads']}; {m['platform']}.",
        f"- Versions: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
        f"bitsandbytes {m['bitsandbytes']}, loracast {m['loracast']} ({m['loracast_commit']}).",
        f"- Load average (1, 5, 15 min) before / after: {load_text}. The cores are shared with other work: every "
        "figure is a median with its min-max; ratios to the frozen base are taken per round inside one process "
        "(steadier than ratios across processes).",
    ]


def write_report(run: dict, out: str) -> str:
    """Write RESULTS.md (and results.png when matplotlib is installed) into `out`; returns the .md path."""
    res = Results(run)
    lines = ["# loracast vs PEFT: benchmark results", "",
             "Written by `make bench` (`benchmarks/run.py`); every number below comes from the one run described "
             "here. Lower is better everywhere; `x PEFT` below 1 means loracast is faster or smaller.", ""]
    lines += _machine_lines(run)
    lines += ["", "## Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for name, goal, measured, met in evaluate(res):
        lines.append(f"| {name} | {goal} | {measured} | {'yes' if met else ('n/a' if met is None else '**no**')} |")
    for case, title in (("train_bf16_fp32", "Training step: bf16 base, fp32 adapters (PEFT's default)"),
                        ("train_bf16_bf16", "Training step: bf16 base, bf16 adapters"),
                        ("train_fp32_fp32", "Training step: fp32 base, fp32 adapters"),
                        ("qlora", "Training step: 4-bit base (bitsandbytes nf4, bf16 compute), fp32 adapters")):
        skipped = [r.get("skipped") or r.get("error") for r in run["results"] if r["case"] == case
                   and ("skipped" in r or "error" in r)]
        if not any(r["case"] == case for r in run["results"]):
            continue
        info = res.info(case, "loracast")
        lines += ["", f"## {title}", ""]
        if info.get("tokens"):
            lines += [f"{info['tokens']} tokens per step; AdamW over the adapter parameters; peak RSS is the whole "
                      "process during one step (base weights included).", ""]
        lines += [f"Not measured: {s.splitlines()[-1]}" for s in skipped if s] or _training_table(res, case)
    sections = (("infer", "Inference latency: bf16 base, fp32 adapters, one sequence", _inference_table),
                ("merge", "Merge precision (bf16 base)", _merge_table),
                ("inject_deep", "Injection, saving and loading", _injection_table))
    for case, title, table in sections:
        if any(r["case"] == case for r in run["results"]):
            lines += ["", f"## {title}", ""] + table(res)
    notes_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "NOTES.md")
    if os.path.exists(notes_path) and out == os.path.dirname(notes_path):
        lines += ["", "## Notes and profiles", "", "See [NOTES.md](NOTES.md)."]
    failed = [r for r in run["results"] if "error" in r]
    if failed:
        lines += ["", "## Failed workers", ""] + [f"- {r['case']} / {r['impl']}: `{r['error'].splitlines()[-1]}`"
                                                  for r in failed]
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
    for label, value in (
            ("step bf16+fp32 (fast)", res.vs_peft("train_bf16_fp32", "fast")),
            ("step bf16+fp32 (exact)", res.vs_peft("train_bf16_fp32", "exact")),
            ("step bf16+bf16 (exact)", res.vs_peft("train_bf16_bf16", "exact")),
            ("step fp32 (exact)", res.vs_peft("train_fp32_fp32", "exact")),
            ("step 4-bit (fast)", res.vs_peft("qlora", "fast")),
            ("inference unmerged (fast)", res.vs_peft("infer", "fast")),
            ("inject deep", res.vs_peft("inject_deep", "inject", "inject")),
            ("inject 7B meta", res.vs_peft("inject_meta", "inject", "inject")),
            ("save", res.vs_peft("save_load", "save", "save")),
            ("from_pretrained", res.vs_peft("save_load", "load", "load"))):
        if value is not None:
            bars.append((label, value))
    groups = [(case.replace("train_", "").replace("_", "+"), case) for case in
              ("train_bf16_fp32", "train_bf16_bf16", "train_fp32_fp32", "qlora")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    if bars:
        labels, values = zip(*bars)
        left.barh(labels, values, color=["#2a7" if v <= 1 else "#c44" for v in values])
        left.axvline(1.0, color="black", lw=1)
        left.set_xscale("log")
        left.set_xlabel("loracast time / PEFT time (log scale; < 1 is faster)")
        left.invert_yaxis()
    width = 0.27
    for offset, (row, impl, color) in enumerate((("peft", "peft", "#888"), ("exact", "loracast", "#48c"),
                                                 ("fast", "loracast", "#2a7"))):
        xs, ys = [], []
        for index, (_, case) in enumerate(groups):
            ratios = res.vs_bound(case, impl, row)
            if ratios:
                xs.append(index + (offset - 1) * width)
                ys.append(statistics.median(ratios))
        right.bar(xs, ys, width, label=ROW_LABELS[row], color=color)
    right.axhline(1.0, color="black", lw=1)
    right.set_xticks(range(len(groups)), [g[0] for g in groups])
    right.set_ylabel("training step / frozen-base bound (per round median)")
    right.set_ylim(bottom=0.9)
    right.legend()
    fig.tight_layout()
    path = os.path.join(out, "results.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
