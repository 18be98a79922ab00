"""Reading the files tripletctl parses, bounded; and telling an orphaned temporary from a live one.

A path may name anything: `/dev/zero` or `/dev/urandom` never end, a FIFO blocks for ever, a
directory cannot be read. So a file is opened without blocking, refused by its type (only a regular
file is read), and read to at most `limit` bytes before any parser sees it: a device or an oversized
file is one line naming it, never gigabytes of memory first.

Temporary files and directories are named `NAME.tmp-PID` (and `NAME.trash-PID-...`): start-up and
saves remove only those whose process is gone, never a file another live process is writing.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from tripletctl.core.errors import TripletctlError

MIB = 1 << 20
MAX_JSON_BYTES = 256 * MIB  # run.json, state.json, summary.json... (a stream state may hold row buffers)
MAX_LINE_BYTES = 16 * MIB  # one line of metrics.jsonl (a record is a few hundred bytes)

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


class FileRefused(TripletctlError):
    """A file tripletctl would parse that is not a regular file, or is larger than it may be."""


def _not_regular(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((words for test, words in _KINDS if test(mode)), "not a regular file")


def check_regular(path: str | Path) -> None:
    """Refuse `path` unless it is a regular file (symlinks followed): for files a library opens
    itself (torch.load), which would block on a FIFO or read a device for ever."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the reader says so in its own words
    kind = _not_regular(mode)
    if kind is not None:
        raise FileRefused(f"{path} is {kind}, not a regular file: refused")


def _open_regular(path: str | Path) -> int:
    """An fd on `path` once it is known to be a regular file: by its type first (a socket cannot even
    be opened), then again on the open fd (opened without blocking: a FIFO swapped in between would
    wait for a writer); raises OSError as `open` would."""
    check_regular(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    kind = _not_regular(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise FileRefused(f"{path} is {kind}, not a regular file: refused")
    return fd


def read_bytes(path: str | Path, limit: int) -> bytes:
    """The whole of regular file `path`, refused (FileRefused) when it is longer than `limit` bytes.
    OSError (missing, permission) passes through for the caller to word."""
    fd = _open_regular(path)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileRefused(f"{path} is larger than {_size(limit)}: refused")
    return data


def read_text(path: str | Path, limit: int, errors: str = "strict") -> str:
    """`read_bytes` decoded as UTF-8 (UnicodeDecodeError with `errors="strict"`)."""
    return read_bytes(path, limit).decode("utf-8", errors=errors)


def read_lines(path: str | Path, line_limit: int = MAX_LINE_BYTES, errors: str = "strict") -> Iterator[str]:
    """The lines of regular file `path` (without their newline), each at most `line_limit` bytes;
    a longer one is refused, naming its line number. The file as a whole may be any size."""
    fd = _open_regular(path)
    with os.fdopen(fd, "rb") as handle:
        number = 0
        while True:
            line = handle.readline(line_limit + 1)
            if not line:
                return
            number += 1
            if len(line) > line_limit and not line.endswith(b"\n"):  # limit bytes and a newline are fine
                raise FileRefused(f"{path}: line {number} is longer than {_size(line_limit)}: refused")
            yield line.rstrip(b"\n").decode("utf-8", errors=errors)


def _size(limit: int) -> str:
    return f"{limit // MIB} MiB" if limit >= MIB and limit % MIB == 0 else f"{limit:,} bytes"


# ------------------------------------------------------------------------ orphaned temporaries

_OWNER = re.compile(r"\.(?:tmp|trash)-(\d+)(?:-|$)")


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user's counts: it may still be writing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def orphaned(path: str | Path) -> bool:
    """Whether `path`, a `NAME.tmp-PID` / `NAME.trash-PID-...` temporary, was left by a process that
    is gone. This process's own pid counts as gone: it writes its temporaries after start-up cleanup
    and removes them itself, so one with its pid is from an earlier process that had the same number
    (a container starts its process with the same pid every time). A name without a pid is not ours."""
    match = _OWNER.search(Path(path).name)
    if match is None:
        return False
    pid = int(match.group(1))
    return pid == os.getpid() or not process_alive(pid)
