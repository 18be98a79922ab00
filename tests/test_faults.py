"""Fault injection: `kill -9` at seeded points (mid-step, mid-checkpoint-write, mid-swap, mid-cleanup),
SIGTERM/SIGINT at start-up and mid-step, a killed or hung tokenizer worker, a full disk and a
read-only directory. Each fault must end in a resumable run (same final weights as a run never
interrupted), one line and the documented exit code, and leave no half-written file behind.

Killed runs run the real CLI in a subprocess; the uninterrupted reference and the resumes run in
this process (no second import of torch), so the module stays fast. docs/reliability.md lists
every fault with the test that covers it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import alive, assert_tidy, children, final_weights, finish, start, steps_logged, wait_for, write_curriculum
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config.validate import load_curriculum
from tripletctl.core.exit_codes import EXIT_INTERRUPTED, EXIT_WORKER_DIED
from tripletctl.outputs.checkpoint_load import load_checkpoint
from tripletctl.train.run import train

pytestmark = pytest.mark.slow  # end to end: the real CLI, subprocesses, several processes or faults

STEPS = (6, 2, 2)  # checkpoint_every=1: 10 saves, 7 of which replace (and discard) an older one
SEEDED = random.Random(9)
KILL_POINTS = [  # (fault point, the N-th arrival at which the process kills itself)
    ("step", SEEDED.randint(1, 9)),
    ("checkpoint-write", SEEDED.randint(1, 10)),
    ("checkpoint-swap", SEEDED.randint(2, 10)),
    ("checkpoint-cleanup", SEEDED.randint(1, 7)),
]


def curriculum(tmp_path: Path, **kw) -> Path:
    kw.setdefault("steps", STEPS)
    kw.setdefault("checkpoint_every", 1)
    return write_curriculum(tmp_path, **kw)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here and in the subprocesses (OMP_NUM_THREADS=1): the same arithmetic on both
    sides of a comparison, and no thread spinning on a busy 2-core CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread) -> dict[str, torch.Tensor]:
    """Final weights of the fault curriculum run straight through, never interrupted."""
    root = tmp_path_factory.mktemp("reference")
    assert train(load_curriculum(curriculum(root))) == 0
    return final_weights(root / "run")


def assert_same_weights(run: Path, reference: dict[str, torch.Tensor]) -> None:
    weights = final_weights(run)
    assert weights.keys() == reference.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], reference[name], rtol=0, atol=1e-6, msg=name)


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler installed for `sig` (SigCgt in /proc/PID/status)."""
    try:
        status = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (sig - 1) & 1)


# ------------------------------------------------------------------------------- kill -9, then --resume


@pytest.mark.parametrize(("point", "n"), KILL_POINTS, ids=[f"{p}:{n}" for p, n in KILL_POINTS])
def test_kill9_at_a_seeded_point_then_resume_gives_identical_weights(tmp_path, reference, point, n):
    workers = 1 if point == "step" else 0  # one case also checks the worker dies with the trainer
    path = curriculum(tmp_path, tokenizer_workers=workers)
    proc = start(path, env={"TRIPLETCTL_FAULT": f"{point}:{n}"})
    helpers: list[int] = []
    if workers:
        wait_for(lambda: len(children(proc.pid)) >= 2 or proc.poll() is not None, what="the tokenizer worker")
        helpers = children(proc.pid)  # the worker and multiprocessing's resource tracker
    output = finish(proc)
    assert proc.returncode == -signal.SIGKILL, output[-3000:]
    if helpers:  # nothing of the trainer survives it: no 260 MB worker, no resource tracker
        wait_for(lambda: not any(alive(pid) for pid in helpers), timeout=10, what=f"helpers {helpers} to exit")

    assert train(load_curriculum(path), resume=True) == 0
    run = tmp_path / "run"
    assert_same_weights(run, reference)
    assert_tidy(run)
    index = json.loads((run / "run.json").read_text())
    assert [p["status"] for p in index["phases"]] == ["done"] * 3
    for phase in index["phases"]:  # even a phase whose run was killed between its last save and its summary
        summary = json.loads((run / phase["dir"] / "summary.json").read_text())
        assert summary["steps_done"] == phase["steps"]


# ------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_start_up_stops_the_run_with_130(tmp_path, sig):
    path = curriculum(tmp_path)
    proc = start(path)
    # the handler is installed first thing in `train`, before the slow imports; SIGTERM is not
    # caught by Python by default, so seeing it caught means start-up has just begun
    wait_for(lambda: catches(proc.pid, signal.SIGTERM) or proc.poll() is not None, what="the handler")
    proc.send_signal(sig)
    output = finish(proc)
    assert proc.returncode == EXIT_INTERRUPTED, output[-3000:]
    assert "interrupted during start-up" in output and "twice" not in output and "Traceback" not in output
    assert steps_logged(tmp_path / "run") == 0


def test_sigint_mid_step_checkpoints_then_resume_gives_identical_weights(tmp_path, reference):
    # the trainer sends itself the Ctrl-C inside phase 0's third step: one sent from here once the
    # first step was logged could land after the phase's six fast steps had all run
    path = curriculum(tmp_path, checkpoint_every=0)
    proc = start(path, env={"TRIPLETCTL_FAULT": "step:3:INT"})
    run = tmp_path / "run"
    output = finish(proc)
    assert proc.returncode == EXIT_INTERRUPTED, output[-3000:]
    assert "interrupted: checkpoint" in output and "--resume" in output and "twice" not in output
    state = json.loads((run / "phase-0-semi-hard" / "checkpoint" / "state.json").read_text())
    assert state["step"] == steps_logged(run) == 3
    assert json.loads((run / "run.json").read_text())["phases"][0]["status"] == "interrupted"

    assert train(load_curriculum(path), resume=True) == 0
    assert_same_weights(run, reference)
    assert_tidy(run)


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    # long steps (batch 256): the second Ctrl-C lands while the first one waits for the step to end
    path = write_curriculum(tmp_path, steps=(50, 1, 1), checkpoint_every=1)
    spec = path.read_text().replace("batch_size: 16", "batch_size: 256")
    path.write_text(spec)
    proc = start(path)
    run = tmp_path / "run"
    checkpoint = run / "phase-0-semi-hard" / "checkpoint"
    wait_for(lambda: (checkpoint / "COMPLETE").exists() or proc.poll() is not None, what="a checkpoint")
    proc.send_signal(signal.SIGINT)
    first = ""
    while "press Ctrl-C again" not in first:  # the handler says it heard the first one
        line = proc.stdout.readline()
        assert line, first[-3000:]
        first += line
    proc.send_signal(signal.SIGINT)
    output = first + finish(proc, timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, output[-3000:]
    assert "interrupted twice: stopped without writing a checkpoint" in output and "Traceback" not in output
    kept = load_checkpoint(run / "phase-0-semi-hard")  # checkpoint.prev if stopped between two renames
    assert kept.state["step"] >= 1
    assert json.loads((run / "run.json").read_text())["phases"][0]["status"] == "interrupted"
    assert_tidy(run, prev_allowed=True)


# ------------------------------------------------------------------------------- tokenizer workers


def stalled(run: Path, seconds: float = 1.5) -> bool:
    before = steps_logged(run)
    time.sleep(seconds)
    return steps_logged(run) == before


def worker_of(proc: subprocess.Popen) -> int:
    for pid in children(proc.pid):
        if b"spawn_main" in (Path("/proc") / str(pid) / "cmdline").read_bytes():
            return pid
    raise AssertionError("no worker process")


def kill_worker_in_phase_0(proc: subprocess.Popen, run: Path, sig: int) -> int:
    """Freeze the trainer once it has logged a step (so it is still in phase 0 whatever the load),
    send `sig` to its worker, let it go on. Phase 0 must need more batches than are prefetched."""
    wait_for(lambda: steps_logged(run) >= 1 or proc.poll() is not None, what="a step")
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert not (run / "phase-1-hard-negative").exists()
        worker = worker_of(proc)
        os.kill(worker, sig)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    return worker


def spawned_worker(proc: subprocess.Popen) -> int | None:
    """The tokenizer worker's pid once its interpreter exists (before it has imported anything)."""
    for pid in children(proc.pid):
        try:
            if b"spawn_main" in (Path("/proc") / str(pid) / "cmdline").read_bytes():
                return pid
        except OSError:
            pass
    return None


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
def test_ctrl_c_to_the_group_while_the_worker_starts_is_an_interrupt_with_the_exact_command(tmp_path, resumed):
    """Issue 23 #7, #8: a terminal's Ctrl-C reaches the worker too; it was a KeyboardInterrupt traceback
    from the worker's start-up and "worker died" (exit 5), and the hint dropped every override."""
    path = curriculum(tmp_path, tokenizer_workers=1)
    overrides = [f"train.output_dir={tmp_path / 'my run'}", "phases.0.steps=5"]
    if resumed:
        assert CliRunner().invoke(app, ["train", str(path), *overrides, "--max-steps", "1"]).exit_code == 0
    proc = start(path, *overrides, *(["--resume"] if resumed else []), group=True)
    try:
        wait_for(lambda: spawned_worker(proc) is not None or proc.poll() is not None, what="the worker")
        os.killpg(proc.pid, signal.SIGINT)  # the whole group, as a terminal sends it
        output = finish(proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_INTERRUPTED, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output and "worker" not in output, output
    assert "after this step" not in output, output  # no step had begun
    command = shlex.join(["tripletctl", "train", str(path), *overrides, *(["--resume"] if resumed else [])])
    said = " ".join(output.split())
    assert f"{'continue' if resumed else 'start again'} with `{command}`" in said, output
    assert steps_logged(tmp_path / "my run") == (1 if resumed else 0)


def test_a_killed_tokenizer_worker_ends_the_run_with_exit_5_and_it_resumes(tmp_path, reference):
    path = curriculum(tmp_path, tokenizer_workers=1)
    path.write_text(path.read_text().replace("tokenizer_workers: 1", "tokenizer_workers: 1\n  prefetch_batches: 1"))
    proc = start(path)
    run = tmp_path / "run"
    kill_worker_in_phase_0(proc, run, signal.SIGKILL)
    killed = time.monotonic()
    output = finish(proc)
    assert time.monotonic() - killed < 60, "the run did not notice the dead worker within seconds"
    assert proc.returncode == EXIT_WORKER_DIED, output[-3000:]
    stopped = [line for line in output.splitlines() if "tokenizer worker process" in line]
    assert len(stopped) == 1 and "killed by SIGKILL" in stopped[0] and "--resume" in stopped[0], output[-3000:]
    assert "Traceback" not in output
    index = json.loads((run / "run.json").read_text())
    assert index["phases"][0]["status"] == "stopped (worker died)"

    assert train(load_curriculum(path), resume=True) == 0
    assert_same_weights(run, reference)
    assert_tidy(run)


def test_sigterm_stops_a_run_whose_worker_hangs(tmp_path):
    """A worker that stops answering (SIGSTOP) must not keep SIGTERM from ending the run."""
    path = write_curriculum(tmp_path, steps=(400, 1, 1), checkpoint_every=0, tokenizer_workers=1)
    proc = start(path)
    run = tmp_path / "run"
    worker = kill_worker_in_phase_0(proc, run, signal.SIGSTOP)
    try:
        # the prefetched batches run out; the trainer then waits for the frozen worker
        wait_for(lambda: stalled(run), what="the trainer to wait")
        proc.send_signal(signal.SIGTERM)
        output = finish(proc, timeout=120)
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)
    assert proc.returncode == EXIT_INTERRUPTED, output[-3000:]
    state = json.loads((run / "phase-0-semi-hard" / "checkpoint" / "state.json").read_text())
    assert state["step"] == steps_logged(run) >= 1
    assert not alive(worker)


# ------------------------------------------------------------------------------- full disk, read-only


def mount_tmpfs(directory: Path, size: str) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True)
    return done.returncode == 0


def unmount(directory: Path) -> None:
    subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("size", ["2200k", "2800k"], ids=["fails-in-model-safetensors", "fails-in-torch-save"])
def test_a_full_disk_is_one_line_exit_2_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, size):
    disk = tmp_path / "disk"
    mounted = mount_tmpfs(disk, size)
    if not mounted:  # no tmpfs here: the second checkpoint's writes fail as a full disk would
        import tripletctl.outputs.checkpoint_save as checkpoint_module

        saves = {"n": 0}
        real_write = checkpoint_module._write_contents

        def write_then_fill(tmp, **kw):
            saves["n"] += 1
            if saves["n"] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "optimizer.pt"))
            real_write(tmp, **kw)

        monkeypatch.setattr(checkpoint_module, "_write_contents", write_then_fill)
    try:
        path = write_curriculum(tmp_path, steps=(3, 1, 1), checkpoint_every=1)
        path.write_text(path.read_text().replace(str(tmp_path / "run"), str(disk / "run")))
        result = CliRunner().invoke(app, ["train", str(path)])
        run = disk / "run"
        assert result.exit_code == 2, result.output
        lines = error_lines(result.output)
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        assert "No space left on device" in lines[0] and f"{run}/phase-0-semi-hard/checkpoint" in lines[0]
        assert "last good checkpoint" in lines[0]
        kept = load_checkpoint(run / "phase-0-semi-hard")
        assert kept.state["step"] == 1
        index = json.loads((run / "run.json").read_text())
        assert index["phases"][0]["status"] == "failed" and "No space left" in index["error"]
        assert_tidy(run)
    finally:
        if mounted:
            unmount(disk)


def make_read_only(directory: Path, monkeypatch) -> callable:
    """The directory becomes read-only: a read-only bind mount as root, chmod otherwise; where
    neither works, writes under it raise EROFS. Returns the undo."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [directory, *directory.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        return lambda: [p.chmod(m) for p, m in modes.items()]
    bind = subprocess.run(["mount", "--bind", str(directory), str(directory)], capture_output=True)
    if bind.returncode == 0:
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], capture_output=True)
        if ro.returncode == 0:
            return lambda: unmount(directory)
        unmount(directory)
    real_open = os.open

    def refuse(path, flags, *args, **kw):
        if str(path).startswith(str(directory)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(
        "builtins.open",
        lambda file, mode="r", *a, _o=open, **k: (
            (refuse(file, os.O_WRONLY) if any(c in mode for c in "wax+") else None) or _o(file, mode, *a, **k)
        ),
    )
    return lambda: None


def test_a_read_only_output_directory_is_one_line_exit_2_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    path = write_curriculum(tmp_path, steps=(1, 1, 1), checkpoint_every=1)
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(path), "--max-steps", "1"]).exit_code == 0
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    undo = make_read_only(run, monkeypatch)
    try:
        result = runner.invoke(app, ["train", str(path), "--resume"])
    finally:
        undo()
    assert result.exit_code == 2, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert f"cannot write {run}" in lines[0]
    assert any(cause in lines[0] for cause in ("Read-only file system", "Permission denied")), lines[0]
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # nothing half-written, the checkpoint as it was
