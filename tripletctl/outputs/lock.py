"""One writer per run directory, and never another tool's directory (docs/reliability.md, Guarantees).

`train` claims `train.output_dir` before it cleans or writes anything there, and holds the claim
until it exits: the directory must be absent, empty, or a tripletctl run (run.json with its marker,
or a run from before the marker: a tripletctl-shaped run.json beside a complete checkpoint), and
never `/` or the home directory; then an exclusive `flock` on `OUTPUT/.tripletctl.lock`, which holds
the holder's PID. The kernel drops the lock when the process dies, however it dies (`kill -9`
leaves no stale lock), and tokenizer workers are spawned, so they never inherit it. A second
`train` (or `--resume`) on a held directory stops at once with one line naming the holder's PID.
Under torchrun only rank 0 claims the directory (only rank 0 writes there).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tripletctl.core.errors import OutputError, TripletctlError, one_line, writing
from tripletctl.core.files import read_bytes
from tripletctl.outputs.checkpoint_find import latest_checkpoint
from tripletctl.outputs.run_file import RUN_FILE, looks_like_ours, read_run, written_by_us

LOCK_FILE = ".tripletctl.lock"
NEW_DIR = "set train.output_dir=... to a new or empty directory"


class RunDirRefused(TripletctlError):
    """An output directory `train` may not write: `/`, home, another tool's, or held by another run."""


def lock_file(output: str | Path) -> Path:
    return Path(output) / LOCK_FILE


def check_run_dir(output: str | Path) -> None:
    """Refuse to write a run where it would mix with files that are not a tripletctl run's."""
    output = Path(output)
    resolved = output.resolve()
    if resolved == Path(resolved.anchor):
        raise RunDirRefused(
            f"train.output_dir {output} is the root directory: a run writes run.json, curriculum.yaml "
            f"and phase-K-NAME/ into its output directory; {NEW_DIR}"
        )
    if resolved == _home():
        raise RunDirRefused(
            f"train.output_dir {output} is the home directory: a run writes run.json, curriculum.yaml "
            f"and phase-K-NAME/ into its output directory; {NEW_DIR}"
        )
    if output.is_symlink() and not output.exists():
        raise RunDirRefused(
            f"train.output_dir {output} is a dangling symlink (to {os.readlink(output)}, which does not exist): "
            f"create that directory, remove the link, or {NEW_DIR}"
        )
    if not output.exists():
        return
    if not output.is_dir():
        raise RunDirRefused(f"train.output_dir {output} exists and is not a directory; {NEW_DIR}")
    names = sorted(entry.name for entry in output.iterdir())
    if not names or LOCK_FILE in names or _is_tripletctl_run(output):
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise RunDirRefused(
        f"train.output_dir {output} is not empty ({shown}) and holds no tripletctl run (no {RUN_FILE} "
        f"written by tripletctl): refusing to write over another tool's files; empty it, or {NEW_DIR}"
    )


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (KeyError, RuntimeError, OSError):  # no HOME and no passwd entry
        return None


def _is_tripletctl_run(output: Path) -> bool:
    record = read_run(output)  # a damaged run.json is one line (CheckpointError)
    if record is None:
        return False
    return written_by_us(record) or (looks_like_ours(record) and latest_checkpoint(output) is not None)


@contextmanager
def claim_run_dir(output: str | Path) -> Iterator[None]:
    """Check `output` (check_run_dir), create it, hold its lock for the duration. A claim that
    leaves nothing else in the directory removes its lock file (and the directory, if it made it)."""
    output = Path(output)
    check_run_dir(output)
    created = not output.exists()
    with writing(output):
        output.mkdir(parents=True, exist_ok=True)
    fd = _take_lock(lock_file(output))
    try:
        yield
    finally:
        try:
            if {entry.name for entry in output.iterdir()} == {LOCK_FILE}:  # nothing was written
                lock_file(output).unlink()  # while holding it: a waiter re-checks the inode
                if created:
                    output.rmdir()
        except OSError:
            pass  # best effort: a leftover lock file is harmless
        os.close(fd)  # releases the lock


def _take_lock(path: Path) -> int:
    """An fd holding the exclusive lock on `path`, with this process's PID written into it."""
    for _ in range(20):
        with writing(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunDirRefused(_in_use(path)) from None
            raise OutputError(f"cannot lock {path}: {error.strerror or one_line(error)}") from None
        try:  # the holder may have removed the file (it wrote nothing) just before we locked it
            current = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            with writing(path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise RunDirRefused(_in_use(path))


def _in_use(path: Path) -> str:
    holder = "another process"
    for _ in range(10):  # the holder writes its PID just after taking the lock
        try:
            text = read_bytes(path, 64).decode("ascii", errors="replace").strip()
        except (OSError, TripletctlError):
            text = ""
        if text.isdigit():
            holder = f"PID {text}"
            break
        time.sleep(0.1)
    output = path.parent
    return (
        f"train.output_dir {output} is in use: another tripletctl train ({holder}) holds {path}; "
        f"wait for it to end or stop it, or {NEW_DIR}"
    )
