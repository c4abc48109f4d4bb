"""Checkpoints of a run: which are complete, what run they belong to, which to resume from.

transformers' `Trainer` writes ``checkpoint-N`` (the adapter in PEFT's format, the optimizer,
scheduler and RNG states, the trainer state with the data position) file by file. A checkpoint
counts as complete only once loracast's marker, ``loracast_checkpoint.json``, has been written
into it, atomically and last: a run killed while saving leaves a folder without the marker,
which resuming ignores (and removes), so the previous complete checkpoint is the one used. Old
checkpoints are removed only after the newer one is complete (the trainer's own rotation, which
runs before the marker could be written, is not used).

The marker records the run's identity (model, precision policy, base dtype, LoRA settings,
sequence length): resuming under another identity is refused, naming the difference.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracast._atomic import atomic_write_text
from loracast.errors import LoracastError

CHECKPOINTS_DIR = "checkpoints"
MARKER = "loracast_checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(LoracastError):
    """No checkpoint to resume from, or one from another run."""


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must share with the run that resumes it (the flag that sets each, and its value)."""

    values: dict[str, Any]

    def difference(self, other: RunIdentity) -> str | None:
        """The first setting on which `other` (a checkpoint's) differs from this run, as words; None when equal."""
        for key, mine in self.values.items():
            theirs = other.values.get(key)
            if theirs != mine:
                return f"{key} {theirs!r} there, {mine!r} here"
        return None


def checkpoint_step(folder: Path) -> int | None:
    """The step of a ``checkpoint-N`` folder; None for any other name."""
    match = _NAME.match(folder.name)
    return int(match.group(1)) if match else None


def _checkpoint_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def is_complete(folder: Path) -> bool:
    """Whether `folder` is a checkpoint whose saving finished."""
    return (folder / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first."""
    return [p for p in _checkpoint_folders(root) if is_complete(p)]


def mark_complete(folder: Path, identity: RunIdentity, extra: dict[str, Any] | None = None) -> None:
    """Write the marker that makes `folder` a complete checkpoint of the run `identity` names."""
    payload = {"identity": identity.values, **(extra or {})}
    atomic_write_text(str(folder / MARKER), json.dumps(payload, indent=2) + "\n")


def read_marker(folder: Path) -> dict[str, Any]:
    """The marker of a complete checkpoint.

    Raises:
        CheckpointError: the marker is missing or unreadable.
    """
    try:
        payload = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder} is not a complete loracast checkpoint ({MARKER} missing or unreadable); "
                              f"pass a checkpoint-N folder written by loracast train, or --resume alone for the "
                              "latest complete one") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("identity"), dict):
        raise CheckpointError(f"{folder / MARKER} is not a loracast checkpoint marker; pass another checkpoint")
    return payload


def rotate(root: Path, keep: int | None, protect: Path | None = None) -> list[Path]:
    """Remove the oldest complete checkpoints beyond the newest `keep` (never `protect`, the best
    one); also remove incomplete ones older than the newest complete. Returns what was removed."""
    complete = complete_checkpoints(root)
    removed = []
    if complete:
        newest = checkpoint_step(complete[-1]) or 0
        for folder in _checkpoint_folders(root):
            if not is_complete(folder) and (checkpoint_step(folder) or 0) < newest:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    if keep is not None:
        for folder in complete[:max(0, len(complete) - keep)]:
            if protect is not None and folder.resolve() == protect.resolve():
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def resume_point(root: Path, resume: str, identity: RunIdentity) -> Path:
    """The checkpoint to resume from: the latest complete one under `root` (`resume` "latest"),
    or the folder `resume` names; checked against this run's `identity`. Incomplete checkpoints
    newer than it (a save that was killed) are removed.

    Raises:
        CheckpointError: there is none, it is incomplete, or it belongs to another run.
    """
    if resume == "latest":
        complete = complete_checkpoints(root)
        if not complete:
            raise CheckpointError(f"--resume: no complete checkpoint in {root}; start without --resume, or pass "
                                  "--resume PATH to a checkpoint-N folder")
        chosen = complete[-1]
    else:
        chosen = Path(resume)
        if not chosen.is_dir():
            raise CheckpointError(f"--resume {resume}: no such folder; pass a checkpoint-N folder or --resume alone")
    marker = read_marker(chosen)
    difference = identity.difference(RunIdentity(marker["identity"]))
    if difference is not None:
        raise CheckpointError(f"--resume {chosen}: that checkpoint is from another run ({difference}); pass the same "
                              "settings, or train into a new --out")
    step = checkpoint_step(chosen) or 0
    for folder in _checkpoint_folders(chosen.parent):
        if not is_complete(folder) and (checkpoint_step(folder) or 0) > step:
            shutil.rmtree(folder, ignore_errors=True)
    return chosen


class CompleteCheckpoints:
    """Put before loracast's `Trainer` (``class T(CompleteCheckpoints, Trainer)``): each checkpoint
    the trainer saves is marked complete once written, with the trainer's ``identity``
    (`RunIdentity`), and the oldest are rotated out beyond ``settings.save_total_limit``."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # a folder being (re)written must not look complete until the marker is written again
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            (folder / MARKER).unlink(missing_ok=True)
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            mark_complete(folder, self.identity, {"step": self.state.global_step})
            best = self.state.best_model_checkpoint
            rotate(folder.parent, self.settings.save_total_limit, Path(best) if best else None)
        if self.args.world_size > 1:
            import torch.distributed

            torch.distributed.barrier()  # every process sees the checkpoint complete before going on
