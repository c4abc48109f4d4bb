"""Every Python snippet of the documentation runs.

The fenced ```python blocks of README.md and of each page under docs/ are executed in order, one
namespace per page, in a fresh working folder: a page's later blocks see what its earlier blocks
defined, as a reader typing them would. A block whose first line is a ``# no-run: <reason>``
comment is shown but not executed; only the blocks listed in `NOT_RUN` may say so, so a new
snippet runs unless someone decides otherwise here. Shell transcripts and other languages are not
executed.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NO_RUN = "# no-run:"

# page -> how many of its blocks are shown but not run, and why
NOT_RUN = {
    "docs/distributed.md": (1, "a training script for torchrun: it starts a process group"),
    "docs/switching-from-peft.md": (2, "TRL's SFTTrainer needs a tokenizer and a chat dataset (tests/test_trainer_pipelines.py)"),
}

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^`\n]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Snippet:
    """One fenced Python block: where it is and its code."""

    page: str
    line: int
    code: str

    @property
    def runs(self) -> bool:
        """False for a block that opens with the ``# no-run:`` marker."""
        return not self.code.lstrip().startswith(NO_RUN)


def snippets(path: Path) -> list[Snippet]:
    """The ```python blocks of one Markdown file, in order (indented blocks inside list items too)."""
    text = path.read_text(encoding="utf-8")
    page = path.relative_to(ROOT).as_posix()
    found = []
    for match in FENCE.finditer(text):
        if match.group("info").split()[:1] != ["python"]:
            continue
        indent = len(match.group("indent"))
        code = "\n".join(line[indent:] for line in match.group("body").splitlines())
        found.append(Snippet(page, text.count("\n", 0, match.start()) + 1, code))
    return found


def _pages_with_snippets() -> list[Path]:
    return [path for path in PAGES if snippets(path)]


def test_only_the_listed_snippets_are_not_run():
    """The ``# no-run:`` marker is an exception, listed with its reason in `NOT_RUN`."""
    marked = {}
    for path in PAGES:
        skipped = [snippet for snippet in snippets(path) if not snippet.runs]
        if skipped:
            marked[skipped[0].page] = len(skipped)
    assert marked == {page: count for page, (count, _why) in NOT_RUN.items()}


def test_the_pages_have_snippets():
    """The extraction finds the blocks (a broken pattern would make every page pass vacuously)."""
    pages = {path.relative_to(ROOT).as_posix() for path in _pages_with_snippets()}
    assert {"README.md", "docs/switching-from-peft.md", "docs/precision.md", "docs/qlora.md"} <= pages


@pytest.mark.parametrize("path", _pages_with_snippets(), ids=lambda path: path.relative_to(ROOT).as_posix())
def test_snippets_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each page's blocks, executed in order in one namespace, in an empty working folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict[str, object] = {"__name__": "__docs__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # snippets may warn on purpose (a fingerprint that differs, a requantized merge)
        for snippet in snippets(path):
            if not snippet.runs:
                continue
            try:
                exec(compile(snippet.code, f"{snippet.page}:{snippet.line}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"the snippet at {snippet.page}:{snippet.line} failed: {error!r}") from error
