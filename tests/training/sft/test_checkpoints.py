"""Which checkpoints count and which are kept (training/common/checkpoints.py), on folders made here."""

from __future__ import annotations

import pytest

from loracast.training.common.checkpoints import (
    CheckpointError,
    RunIdentity,
    complete_checkpoints,
    mark_complete,
    resume_point,
    rotate,
)

IDENTITY = RunIdentity({"--model": "m", "--precision": "stable", "--r": 16})


def _checkpoints(root, complete, incomplete=()):
    for step in [*complete, *incomplete]:
        (root / f"checkpoint-{step}").mkdir(parents=True)
        (root / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"x")
    for step in complete:
        mark_complete(root / f"checkpoint-{step}", IDENTITY, {"step": step})


def test_only_marked_checkpoints_count_in_step_order(tmp_path):
    _checkpoints(tmp_path, [2, 10, 4], incomplete=[12])
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    assert resume_point(tmp_path, "latest", IDENTITY).name == "checkpoint-10"
    assert not (tmp_path / "checkpoint-12").exists()  # the killed save is removed, the previous one used


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    _checkpoints(tmp_path, [2, 4, 6, 8], incomplete=[3])
    removed = rotate(tmp_path, keep=2, protect=tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]
    assert {p.name for p in removed} == {"checkpoint-3", "checkpoint-4"}


@pytest.mark.parametrize(("values", "named"), [({"--precision": "fast"}, "--precision 'stable' there, 'fast' here"),
                                               ({"--r": 8}, "--r 16 there, 8 here")])
def test_a_checkpoint_of_another_run_names_the_setting(tmp_path, values, named):
    _checkpoints(tmp_path, [2])
    with pytest.raises(CheckpointError, match=named):
        resume_point(tmp_path, "latest", RunIdentity({**IDENTITY.values, **values}))


def test_a_folder_that_is_not_a_complete_checkpoint(tmp_path):
    _checkpoints(tmp_path, [], incomplete=[2])
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resume_point(tmp_path, "latest", IDENTITY)
    with pytest.raises(CheckpointError, match="not a complete loracast checkpoint"):
        resume_point(tmp_path, str(tmp_path / "checkpoint-2"), IDENTITY)
    with pytest.raises(CheckpointError, match="no such folder"):
        resume_point(tmp_path, str(tmp_path / "checkpoint-9"), IDENTITY)
