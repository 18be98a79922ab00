"""`tripletctl export` through the CLI: only the model folder, from any checkpoint path, atomically;
every bad input is one line and exit 2 with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import save_previous_format
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config.blocks import ModelConfig
from tripletctl.model.encoder import build_model, encode, load_model
from tripletctl.outputs.checkpoint_save import save_checkpoint

TEXTS = ["alpha beta", "gamma", "delta epsilon zeta"]
CURRICULUM = {
    "model": {"name": "tiny", "init": "config"},
    "data": {"source": "x.jsonl", "max_length": 24},
    "phases": [
        {"name": "only", "mining": "batch-hard", "batch_size": 8, "margin": 0.2, "steps": 5, "distance": "euclidean"}
    ],
}


@pytest.fixture
def run_dir(tiny_bert_dir, tmp_path) -> Path:
    model, tok = build_model(ModelConfig(name=str(tiny_bert_dir), init="config", head=(16,)), seed=0)
    opt = torch.optim.AdamW(model.parameters())
    run = tmp_path / "run"
    (run).mkdir()
    (run / "run.json").write_text("{}")
    save_checkpoint(
        run / "phase-0-only" / "checkpoint",
        model=model,
        tokenizer=tok,
        optimizer=opt,
        state={"phase_index": 0, "phase_name": "only", "step": 5, "global_step": 5},
        stream_state={"row": 3},
        curriculum=CURRICULUM,
    )
    return run


def export(*args: str):
    return CliRunner().invoke(app, ["export", *args])


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["run", "phase", "checkpoint"])
def test_exports_only_the_model_folder(run_dir, tmp_path, which):
    source = {"run": run_dir, "phase": run_dir / "phase-0-only", "checkpoint": run_dir / "phase-0-only" / "checkpoint"}[
        which
    ]
    out = tmp_path / "out" / "model"
    result = export(str(source), str(out))
    assert result.exit_code == 0, result.output
    assert "hf upload" in result.output
    model_dir = run_dir / "phase-0-only" / "checkpoint" / "model"
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(
        p.relative_to(model_dir) for p in model_dir.rglob("*")
    )
    for name in ("optimizer.pt", "rng.pt", "state.json", "COMPLETE"):
        assert not list(out.rglob(name))
    assert (out / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no temporary left beside it
    exported, tok = load_model(out)
    original, _ = load_model(model_dir)
    torch.testing.assert_close(encode(exported, tok, TEXTS), encode(original, tok, TEXTS), atol=0, rtol=0)


def test_non_empty_out_dir_needs_force(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_error_line(export(str(run_dir), str(out)))
    assert "not empty" in line and "--force" in line
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    result = export(str(run_dir), str(out), "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "modules.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


def test_empty_out_dir_is_fine(run_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    assert export(str(run_dir), str(tmp_path / "empty")).exit_code == 0
    assert (tmp_path / "empty" / "README.md").is_file()


def test_missing_checkpoint(tmp_path):
    line = one_error_line(export(str(tmp_path / "nowhere"), str(tmp_path / "out")))
    assert "does not exist" in line
    assert not (tmp_path / "out").exists()


def test_incomplete_checkpoint(run_dir, tmp_path):
    (run_dir / "phase-0-only" / "checkpoint" / "COMPLETE").unlink()
    line = one_error_line(export(str(run_dir / "phase-0-only"), str(tmp_path / "out")))
    assert "no complete checkpoint" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated-weights", "missing-dense", "bad-json", "no-model-dir"])
def test_damaged_checkpoint(run_dir, tmp_path, damage):
    model_dir = run_dir / "phase-0-only" / "checkpoint" / "model"
    if damage == "truncated-weights":
        weights = model_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "missing-dense":
        (model_dir / "2_Dense" / "model.safetensors").unlink()
    elif damage == "bad-json":
        (model_dir / "tripletctl_model.json").write_text("{not json")
    else:
        import shutil

        shutil.rmtree(model_dir)
    out = tmp_path / "out"
    line = one_error_line(export(str(run_dir), str(out)))
    assert str(model_dir) in line
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_out_dir_overlapping_the_source_is_refused(run_dir):
    line = one_error_line(export(str(run_dir), str(run_dir), "--force"))
    assert "overlaps" in line
    assert (run_dir / "phase-0-only" / "checkpoint" / "COMPLETE").is_file()  # nothing deleted


def test_out_dir_inside_or_around_the_source_run_is_refused_even_with_force(run_dir, tmp_path):
    import shutil

    shutil.copytree(run_dir / "phase-0-only", run_dir / "phase-1-next")  # the run's latest model is phase 1's
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    alias = tmp_path / "alias"
    alias.symlink_to(run_dir / "phase-0-only")
    for out in (run_dir / "phase-0-only", run_dir / "new", alias, tmp_path):
        line = one_error_line(export(str(run_dir), str(out), "--force"))
        assert f"OUT_DIR {out} overlaps the source" in line and str(run_dir) in line, line
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # no checkpoint replaced
    assert sorted(p.name for p in run_dir.iterdir()) == ["phase-0-only", "phase-1-next", "run.json"]


def test_best_without_a_best_model(run_dir, tmp_path):
    line = one_error_line(export(str(run_dir), str(tmp_path / "out"), "--best"))
    assert "no complete best model" in line and "keep_best" in line


def test_previous_format_is_resaved_in_the_current_one(tiny_bert_dir, tmp_path):

    model, tok = build_model(ModelConfig(name=str(tiny_bert_dir), init="config", head=(16,)), seed=1)
    source = tmp_path / "old"
    save_previous_format(model, tok, source)
    result = export(str(source), str(tmp_path / "new"))
    assert result.exit_code == 0, result.output
    assert "previous format" in result.output
    meta = json.loads((tmp_path / "new" / "tripletctl_model.json").read_text())
    assert meta["format_version"] == 2 and (tmp_path / "new" / "modules.json").is_file()
    exported, tok2 = load_model(tmp_path / "new")
    torch.testing.assert_close(encode(exported, tok2, TEXTS), encode(model.eval(), tok, TEXTS), atol=1e-6, rtol=0)


def test_every_file_of_the_model_folder_has_the_same_mode(run_dir, tmp_path):
    """Issue 36, item 8: model.safetensors was 0600 (transformers writes it through a temporary file)
    while every other file was 0644."""
    out = tmp_path / "exported"
    assert export(str(run_dir), str(out)).exit_code == 0
    for folder in (run_dir / "phase-0-only" / "checkpoint" / "model", out):
        modes = {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()}
        assert modes["model.safetensors"] == modes["config.json"], modes
        assert len(set(modes.values())) == 1, modes


def test_a_symlink_out_of_the_model_folder_or_checkpoint_is_refused_never_copied(run_dir, tmp_path):
    checkpoint = run_dir / "phase-0-only" / "checkpoint"
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (checkpoint / "model" / "NOTES.txt").symlink_to(secret)
    for source in (run_dir, checkpoint / "model"):  # a run (its checkpoint) and the model folder itself
        line = one_error_line(export(str(source), str(tmp_path / "out")))
        assert f"NOTES.txt is a symlink to {secret}, outside the model folder" in line
        assert not (tmp_path / "out").exists()
    (checkpoint / "model" / "NOTES.txt").unlink()
    (checkpoint / "curriculum.yaml").unlink()
    (checkpoint / "curriculum.yaml").symlink_to(secret)
    line = one_error_line(export(str(run_dir), str(tmp_path / "out")))
    assert "outside the checkpoint" in line and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_exports_to_one_out_dir_at_once_one_succeeds(run_dir, tmp_path):
    """Two real processes race for one OUT_DIR: the first is stopped (SIGSTOP at its fault point)
    just before its rename, the second exports meanwhile; the first, continued, is refused in one line."""
    import os
    import signal
    import subprocess
    import sys

    from helpers import wait_for

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tripletctl", "export", str(run_dir), str(out)]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = subprocess.Popen(command, env={**env, "TRIPLETCTL_FAULT": "export-swap:1:STOP"}, **pipes)
    stat = Path(f"/proc/{first.pid}/stat")
    wait_for(lambda: stat.read_text().split(") ")[1].startswith("T"), 300, "the first export to stop")
    second = subprocess.run(command, env=env, timeout=300, **pipes)
    assert second.returncode == 0, second.stderr
    os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "was filled while this export was writing" in err, err
    assert not list(tmp_path.glob(".out.tmp-*"))
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_export_to_a_full_disk_is_one_line_and_leaves_nothing(run_dir, tmp_path, monkeypatch):
    """A 256 KiB tmpfs where one can be mounted (root): copytree's list of failures used to be ~5 KB of
    tuples; else the disk 'fills' at the rename (TRIPLETCTL_FAULT=export-swap:1:ENOSPC)."""
    import os
    import subprocess

    import tripletctl.core.faults as faults

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = (
        os.geteuid() == 0
        and not subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True
        ).returncode
    )
    if not mounted:
        for name, value in (("_POINT", "export-swap"), ("_AT", "1"), ("_SIGNAL", "ENOSPC"), ("_reached", {})):
            monkeypatch.setattr(faults, name, value)
    try:
        line = one_error_line(export(str(run_dir), str(disk / "out")))
        assert "cannot write" in line and "No space left on device" in line and len(line) < 400, line
        assert list(disk.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)])
