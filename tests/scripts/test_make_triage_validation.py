"""scripts/make_triage_validation.py: the validation split the SFT recipe is chosen on comes from
the training conversations alone. Oracle: the shipped file's own splits and the generator's cues."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import make_triage_validation as validation  # noqa: E402
from make_support_triage import URGENT  # noqa: E402


def test_one_high_and_one_low_training_cue_are_held_out_with_every_row_using_them(tmp_path):
    out = tmp_path / "val.jsonl"
    assert validation.main([str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    shipped = [json.loads(line) for line in validation.SHIPPED.read_text().splitlines()]
    shipped_train = [row for row in shipped if row["split"] == "train"]
    assert [row["messages"] for row in rows] == [row["messages"] for row in shipped_train]  # no test row
    held = {validation._cue(row) for row in rows if row["split"] == "test"}
    kept = {validation._cue(row) for row in rows if row["split"] == "train"}
    assert len(held) == 2 and not held & kept
    assert len(held & set(URGENT["high"])) == 1 and len(held & set(URGENT["low"])) == 1
    test_cues = {validation._cue(row) for row in shipped if row["split"] == "test"}
    assert not held & test_cues  # the cues held out are training cues, not the test split's
