"""A one-line progress bar on stderr with loss, throughput and time left.

On a terminal the line is redrawn in place; otherwise (a log file, CI) a line is printed about
every tenth of the run, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Progress over `total` steps; `update` after each step, `close` at the end."""

    def __init__(self, total: int, label: str = "train", stream: TextIO | None = None, enabled: bool = True,
                 width: int = 24, unit: str = "ex") -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.unit = unit  # what `update` counts: examples, or tokens for language models
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._every = max(1, self.total // 10)
        self._start = time.perf_counter()
        self._examples = 0
        self._last_line = ""

    def update(self, step: int, loss: float, examples: int, extra: str = "") -> None:
        """Record that `step` (1-based) finished on `examples` examples (or tokens: see `unit`) with
        training loss `loss`."""
        self._examples += examples
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        filled = int(self.width * step / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        left = elapsed / step * (self.total - step) if step else 0.0
        line = (f"{self.label} [{bar}] {step}/{self.total} loss {loss:.4f} "
                f"{self._examples / elapsed:.1f} {self.unit}/s {elapsed:.0f}s, {left:.0f}s left"
                f"{(' ' + extra) if extra else ''}")
        if self.interactive:
            padding = " " * max(0, len(self._last_line) - len(line))
            self.stream.write("\r" + line + padding)
            self.stream.flush()
        elif step % self._every == 0 or step == self.total:
            self.stream.write(line + "\n")
            self.stream.flush()
        self._last_line = line

    def message(self, text: str) -> None:
        """Print a line of its own (e.g. an eval result) without breaking the bar."""
        if not self.enabled:
            return
        if self.interactive and self._last_line:
            self.stream.write("\r" + " " * len(self._last_line) + "\r")
        self.stream.write(text + "\n")
        if self.interactive and self._last_line:
            self.stream.write(self._last_line)
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled and self.interactive and self._last_line:
            self.stream.write("\n")
            self.stream.flush()
        self._last_line = ""
