"""Build the validation split on which `loracast train`'s SFT recipe is chosen, from the training
conversations of the shipped triage data alone.

The test split of `src/loracast/data/support_triage.jsonl` phrases urgency with cues that no
training conversation uses, and most misses on it are urgency. A validation split that measures
the same thing without touching the test rows holds out one high-urgency and one low-urgency cue
of the training conversations (chosen with a fixed seed): every training conversation that uses
either becomes a "test" row of the output, every other training conversation stays "train", and
the real test rows are left out.

    python scripts/make_triage_validation.py /tmp/triage_validation.jsonl
    loracast train --data /tmp/triage_validation.jsonl --eval-examples 72 --lr 3e-3 --out out/val
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_support_triage import URGENT  # the generator's own cue lists

SEED = 1234
SHIPPED = Path(__file__).resolve().parents[1] / "src" / "loracast" / "data" / "support_triage.jsonl"


def _cue(row: dict) -> str | None:
    message = next(turn["content"] for turn in row["messages"] if turn["role"] == "user")
    return next((cue for level in ("high", "low") for cue in URGENT[level] if cue in message), None)


def validation_rows(rows: list[dict], seed: int = SEED) -> tuple[list[dict], set[str]]:
    """(the training rows, those with a held-out cue relabelled "test"; the held-out cues)."""
    train = [row for row in rows if row["split"] == "train"]
    used = {_cue(row) for row in train}
    rng = random.Random(seed)
    held_out = {rng.choice([cue for cue in URGENT[level] if cue in used]) for level in ("high", "low")}
    return [{**row, "split": "test" if _cue(row) in held_out else "train"} for row in train], held_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the JSONL file to write")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines() if line.strip()]
    out, held_out = validation_rows(rows)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in out), encoding="utf-8")
    tests = sum(row["split"] == "test" for row in out)
    print(f"{args.out}: {len(out) - tests} train, {tests} validation rows (held-out cues: {sorted(held_out)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
