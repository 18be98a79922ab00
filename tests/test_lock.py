"""One writer per run directory, nothing foreign overwritten (outputs/lock.py), with real processes:
a second `train` or `--resume` on a directory another run holds stops at once with exit 2 and the
holder's PID, and the holder finishes untouched; `kill -9` leaves no stale lock; start-up cleanup
removes only dead processes' temporaries; `/`, the home directory and another tool's non-empty
directory are refused before anything is written. Reference: docs/reliability.md, Guarantees."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import alive, assert_tidy, children, finish, one_phase, start, steps_logged, wait_for, write_curriculum
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.outputs.checkpoint_load import load_checkpoint
from tripletctl.outputs.lock import LOCK_FILE

PHASE = "phase-0-semi-hard"


def cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    return " ".join(result.output.split())


def files_of(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def slow_run(tmp_path: Path, steps: int = 60, **kw) -> Path:
    """A one-phase curriculum long enough to be still training while a test acts on it."""
    return one_phase(write_curriculum(tmp_path, steps=(steps, 1, 1), checkpoint_every=5, **kw))


# ------------------------------------------------------------------------------- the lock


@pytest.mark.slow
def test_a_second_train_or_resume_on_a_held_directory_stops_at_once_and_the_holder_finishes(tmp_path):
    path = slow_run(tmp_path)
    run = tmp_path / "run"
    holder = start(path)
    wait_for(lambda: steps_logged(run) >= 1 or holder.poll() is not None, what="the first run's first step")
    for args in ([], ["train.seed=1"], ["--resume"]):  # a second writer, with another seed, or a resume
        line = error_line(cli("train", path, *args))
        assert f"is in use: another tripletctl train (PID {holder.pid})" in line, line
        assert str(run / LOCK_FILE) in line
    assert holder.poll() is None, "the first run ended before the second could be refused: make it longer"
    output = finish(holder)
    assert holder.returncode == 0, output[-3000:]
    assert load_checkpoint(run / PHASE).state["step"] == 60  # its own checkpoint, whole
    assert json.loads((run / "run.json").read_text())["phases"][0]["status"] == "done"
    assert_tidy(run)


@pytest.mark.slow
def test_kill9_of_the_holder_leaves_no_stale_lock(tmp_path):
    path = slow_run(tmp_path, tokenizer_workers=1)  # a spawned worker must not keep the lock either
    run = tmp_path / "run"
    holder = start(path)
    wait_for(lambda: (run / PHASE / "checkpoint" / "COMPLETE").exists() or holder.poll() is not None, what="a save")
    helpers = children(holder.pid)
    holder.send_signal(signal.SIGKILL)
    finish(holder)
    assert (run / LOCK_FILE).read_text().strip() == str(holder.pid)  # the file stays; the lock is gone
    wait_for(lambda: not any(alive(pid) for pid in helpers), timeout=10, what="the worker to exit")
    assert cli("train", path, "--resume", "--max-steps", "1").exit_code == 0


@pytest.mark.slow
def test_start_up_cleanup_removes_only_dead_processes_temporaries(tmp_path):
    path = one_phase(write_curriculum(tmp_path, steps=(3, 1, 1), checkpoint_every=1))
    assert cli("train", path, "--max-steps", "1").exit_code == 0
    run = tmp_path / "run"
    live = subprocess.Popen(["sleep", "120"])  # another process, still writing its temporaries
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        planted = {}
        for pid in (live.pid, dead.pid):
            checkpoint_tmp = run / PHASE / f"checkpoint.tmp-{pid}"
            checkpoint_tmp.mkdir()
            (checkpoint_tmp / "state.json").write_text("{}")
            (run / f"run.json.tmp-{pid}").write_text("{}")
            (run / PHASE / f"summary.json.tmp-{pid}").write_text("{}")
            planted[pid] = [checkpoint_tmp, run / f"run.json.tmp-{pid}", run / PHASE / f"summary.json.tmp-{pid}"]
        assert cli("train", path, "--resume", "--max-steps", "1").exit_code == 0
        assert all(p.exists() for p in planted[live.pid]), "a live process's temporaries were removed"
        assert not any(p.exists() for p in planted[dead.pid]), "a dead process's temporaries were kept"
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------------- whose directory


def test_another_tools_non_empty_directory_is_refused_and_left_as_it_was(tmp_path):
    path = one_phase(write_curriculum(tmp_path, steps=(2, 1, 1), checkpoint_every=1))
    run = tmp_path / "run"
    (run / PHASE).mkdir(parents=True)
    (run / "run.json").write_text('{"tool": "another", "phases": 3}\n')
    (run / "curriculum.yaml").write_text("theirs: true\n")
    (run / PHASE / "metrics.jsonl").write_text('{"their": "metrics"}\n')
    before = files_of(run)
    for args in ([], ["--resume"]):
        line = error_line(cli("train", path, *args))
        assert f"train.output_dir {run} is not empty" in line and "holds no tripletctl run" in line, line
    assert files_of(run) == before and sorted(p.name for p in run.iterdir()) == ["curriculum.yaml", PHASE, "run.json"]


@pytest.mark.parametrize("where", ["root", "home"])
def test_the_root_and_home_directories_are_refused(tmp_path, monkeypatch, where):
    # a missing data source: were the directory not refused first, the run still writes nothing there
    path = one_phase(write_curriculum(tmp_path, source=tmp_path / "no-such-data.jsonl"))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    target = "/" if where == "root" else str(home)
    line = error_line(cli("train", path, f"train.output_dir={target}"))
    assert f"train.output_dir {target} is the {'root' if where == 'root' else 'home'} directory" in line, line
    assert not list(home.iterdir())


@pytest.mark.slow
def test_own_runs_are_recognised_with_or_without_the_marker(tmp_path):
    path = one_phase(write_curriculum(tmp_path, steps=(3, 1, 1), checkpoint_every=1))
    run = tmp_path / "run"
    assert "no checkpoint found" in error_line(cli("train", path, "--resume"))
    assert not run.exists()  # the claim made the directory and, with nothing written, took it back
    assert cli("train", path, "--max-steps", "1").exit_code == 0
    record = json.loads((run / "run.json").read_text())
    assert record["written_by"] == "tripletctl"
    del record["written_by"]  # a run written before the marker existed
    (run / "run.json").write_text(json.dumps(record))
    (run / LOCK_FILE).unlink()
    assert cli("train", path, "--resume", "--max-steps", "1").exit_code == 0
    assert load_checkpoint(run / PHASE).state["step"] == 2


def test_a_dangling_symlink_as_output_dir_is_named_as_such(tmp_path):
    path = one_phase(write_curriculum(tmp_path))
    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "gone")
    line = error_line(cli("train", path, f"train.output_dir={link}"))
    assert f"train.output_dir {link} is a dangling symlink (to {tmp_path / 'gone'}" in line, line
    assert link.is_symlink() and not (tmp_path / "gone").exists()
