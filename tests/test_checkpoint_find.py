"""Finding checkpoints (checkpoint_find.py): which checkpoint a checkpoint, phase or run directory
means, only complete ones trusted, `checkpoint.prev` after a crash mid-swap."""

from __future__ import annotations

import pytest
from helpers import fake_checkpoint

from tripletctl.core.errors import CheckpointError
from tripletctl.outputs.checkpoint_find import latest_checkpoint, phase_dir, resolve_checkpoint


def test_resolve_checkpoint_phase_and_run_dirs(tmp_path):
    run = tmp_path / "run"
    (run).mkdir()
    (run / "run.json").write_text("{}")
    p0 = fake_checkpoint(phase_dir(run, 0, "random") / "checkpoint")
    p2 = fake_checkpoint(phase_dir(run, 2, "semi-hard") / "checkpoint")
    fake_checkpoint(phase_dir(run, 10, "batch-hard") / "checkpoint", complete=False)  # interrupted

    assert resolve_checkpoint(p0) == p0
    assert resolve_checkpoint(p0.parent) == p0
    assert resolve_checkpoint(run) == p2  # numeric order; phase 10 has nothing complete
    assert latest_checkpoint(run) == p2
    assert latest_checkpoint(tmp_path / "nowhere") is None
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_checkpoint(run / "phase-10-batch-hard" / "checkpoint")
    with pytest.raises(CheckpointError, match="phase directory .* no complete checkpoint"):
        resolve_checkpoint(run / "phase-10-batch-hard")


def test_resolve_run_dir_without_run_json(tmp_path):
    p1 = fake_checkpoint(tmp_path / "phase-1-hard" / "checkpoint")
    assert resolve_checkpoint(tmp_path) == p1


def test_resolve_prefers_prev_when_checkpoint_incomplete(tmp_path):
    prev = fake_checkpoint(tmp_path / "checkpoint.prev")
    assert resolve_checkpoint(tmp_path / "checkpoint") == prev  # checkpoint missing entirely
    assert resolve_checkpoint(tmp_path) == prev
    fake_checkpoint(tmp_path / "checkpoint", complete=False)
    assert resolve_checkpoint(tmp_path / "checkpoint") == prev


def test_resolve_junk_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a checkpoint .* phase directory .* run directory"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a directory"):
        resolve_checkpoint(tmp_path / "notes.txt")
    empty_run = tmp_path / "run"
    (empty_run / "phase-0-x").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(empty_run)
