"""Plain-text summaries of finished SFT runs, as `loracast train` prints them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loracast.training.common.console import mib, precision_lines
from loracast.training.sft.run import SftResult

SHOWN = 3  # held-out examples printed with both answers


def _score(entry: dict[str, Any]) -> str:
    text = f"exact match {entry['exact']:.1%}"
    if entry.get("valid_json") is not None:
        text += f", valid JSON {entry['valid_json']:.1%}"
    return text


def _one_line(answer: str, width: int = 160) -> str:
    """An answer on one line of at most `width` characters (base models often answer in paragraphs)."""
    flat = " ".join(answer.split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."


def format_sft_run(result: SftResult) -> str:
    """Scores before/after, a few answers side by side, the precision summary, the doctor's verdict
    and the files of one SFT run."""
    m = result.metrics
    s = m["precision_summary"]
    before, after = m["eval"]["before"], m["eval"]["after"]
    lines = [f"held-out score ({m['eval']['examples']} conversations, greedy answers scored exactly):",
             f"  before: {_score(before)}; assistant-token loss {before['loss']:.4f}",
             f"  after:  {_score(after)}; assistant-token loss {after['loss']:.4f}"]
    if after["fields"]:
        lines.append("  per field, before -> after: " + ", ".join(
            f"{k} {before['fields'].get(k, 0):.0%} -> {v:.0%}" for k, v in after["fields"].items()))
    answers_before, answers_after = result.history.evaluations[0].answers, result.history.evaluations[-1].answers
    for example, b, a in list(zip(result.held_out, answers_before, answers_after))[:SHOWN]:
        lines.append(f"  message:  {example.prompt_messages[-1]['content']}")
        lines.append(f"    base:    {_one_line(b)}")
        lines.append(f"    adapter: {_one_line(a)}")
    if m["diverged_at_step"] is not None:
        lines.append(f"warning: the loss stopped being finite at step {m['diverged_at_step']}; training stopped early")
    lines.extend(precision_lines(m))
    phases = m.get("peak_memory_after")
    if phases:  # the running peak after each phase: the phase where it grows is where the peak comes from
        lines.append("  peak so far after " + ", ".join(f"{name} {mib(value)}" for name, value in phases.items()))
    seconds = s["seconds_per_step"]
    lines.append(f"  time per step {seconds['median']:.2f} s median ({seconds['min']:.2f}-{seconds['max']:.2f}), "
                 f"{m['train']['tokens_per_second']:.0f} tokens/s; {m['train']['steps']} steps of "
                 f"{m['train']['global_batch']}{_processes(m)}; load {m['seconds']['load']:.0f} s, train "
                 f"{m['seconds']['train']:.0f} s, evaluations {m['seconds']['eval']:.0f} s")
    lines.append(f"doctor: {m['doctor']}")
    files = m["files"]
    lines.append(f"saved: {files['adapter']} (PEFT format), {files['metrics']}, {files['plot']}, {files['samples']}")
    return "\n".join(lines)


def _processes(metrics: dict[str, Any]) -> str:
    train = metrics["train"]
    parts = []
    if train.get("processes", 1) > 1:
        parts.append(f"{train['processes']} processes x {train['batch_size']}")
    if train.get("grad_accum", 1) > 1:
        parts.append(f"{train['grad_accum']} accumulated")
    return f" ({', '.join(parts)})" if parts else ""


def format_sft_comparison(results: Sequence[SftResult], plot: str) -> str:
    """Final scores of several SFT runs side by side."""
    width = 24

    def final_loss(result: SftResult) -> float:
        losses = [step.loss for step in result.history.steps]
        tail = losses[-max(1, len(losses) // 10):]
        return sum(tail) / len(tail)

    rows: list[tuple[str, list[str]]] = [
        ("adapters", ["/".join(r.metrics["adapter_dtypes"]) for r in results]),
        ("base", [r.metrics["base_dtype"] for r in results]),
        ("exact match before", [f"{r.metrics['eval']['before']['exact']:.1%}" for r in results]),
        ("exact match after", [f"{r.metrics['eval']['after']['exact']:.1%}" for r in results]),
        ("held-out loss after", [f"{r.metrics['eval']['after']['loss']:.4f}" for r in results]),
        ("final train loss", [f"{final_loss(r):.4f}" for r in results]),
        ("tokens/s", [f"{r.metrics['train']['tokens_per_second']:.0f}" for r in results]),
        ("peak memory (process)", [mib(r.metrics["precision_summary"]["peak_memory"]["bytes"]) for r in results]),
    ]
    header = "".ljust(width) + "".join(r.policy.ljust(width) for r in results)
    body = [name.ljust(width) + "".join(v.ljust(width) for v in values) for name, values in rows]
    return "\n".join([header, *body, f"plot: {plot}"])
