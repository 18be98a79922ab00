"""Errors that mean "bad input" or a fault of the environment: the CLI turns them into one line
and their `exit_code` (2 unless a subclass says otherwise)."""

from __future__ import annotations

import errno as errno_codes
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tripletctl.core.exit_codes import EXIT_BAD_INPUT, EXIT_WORKER_DIED


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """An error (or text) as one line of at most `limit` characters, for one-line messages; some
    libraries raise with no message at all, so an empty one becomes the exception's type name."""
    text = " ".join(str(error).split())
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TripletctlError(Exception):
    """Base class for user-facing errors (bad curriculum, bad data source, bad checkpoint)."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(TripletctlError):
    """Every problem found in a curriculum and its overrides, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class DataError(TripletctlError):
    """A data source that cannot be used: unreachable, missing column, no usable rows."""


class CheckpointError(TripletctlError):
    """A checkpoint path that does not hold a usable checkpoint."""


class OutputError(TripletctlError):
    """The run directory cannot be written: disk full, read-only file system, permission denied."""


class WorkerDiedError(TripletctlError):
    """A tokenizer worker process died (killed, out of memory): not bad input, and the run can resume.

    The trainer checkpoints and exits with `EXIT_WORKER_DIED`; this code is the same number
    for the rare case where the error escapes before a checkpoint can be written."""

    exit_code = EXIT_WORKER_DIED


_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)|\[Errno (\d+)\]")


def write_failure(path: str | Path, error: BaseException) -> OutputError | None:
    """An `OutputError` naming `path` and the cause when `error` is the environment refusing a write
    (disk full, read-only, permission), else None (a real bug: let it crash with its traceback).

    Writers report this differently: Python raises OSError, safetensors a SafetensorError whose
    text holds "os error 28", torch.save a RuntimeError without the errno (checkpoint_save.py records
    the OSError for it); as a last resort the file system is asked whether it is full or read-only.
    """
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if code is None:
        match = _OS_ERROR_IN_TEXT.search(str(error))
        code = int(match.group(1) or match.group(2)) if match else _probe(Path(path))
    if code is None or (not isinstance(error, OSError) and code not in _ENVIRONMENT_ERRNOS):
        return None
    return OutputError(f"cannot write {path}: {os.strerror(code)}")


_ENVIRONMENT_ERRNOS = {
    errno_codes.ENOSPC,
    errno_codes.EROFS,
    errno_codes.EACCES,
    errno_codes.EPERM,
    errno_codes.EDQUOT,
    errno_codes.EIO,
    errno_codes.EFBIG,
}


def _probe(path: Path) -> int | None:
    """ENOSPC / EROFS when the file system holding `path` is (nearly) full or mounted read-only."""
    for candidate in (path, *path.parents):
        try:
            stats = os.statvfs(candidate)
        except OSError:
            continue
        if stats.f_flag & os.ST_RDONLY:
            return errno_codes.EROFS
        if stats.f_bavail * stats.f_frsize < 1 << 20:
            return errno_codes.ENOSPC
        return None
    return None


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a write that the environment refuses (disk full, read-only...) into one `OutputError`
    line naming `path`; any other failure goes on as it is."""
    try:
        yield
    except TripletctlError:
        raise
    except Exception as error:
        failure = write_failure(path, error)
        if failure is None:
            raise
        raise failure from error


class ModelError(TripletctlError):
    """A model that cannot be built or loaded: missing, unreachable, damaged or mismatched files."""


class NonFiniteError(TripletctlError):
    """Embeddings (or weights) that hold NaN or infinity: nothing meaningful can be measured on them."""


# ------------------------------------------------------------------ faults of the process's environment

_TOO_MANY_FILES = (errno_codes.EMFILE, errno_codes.ENFILE)
_WRITE_ERRNOS = (errno_codes.ENOSPC, errno_codes.EDQUOT, errno_codes.EROFS, errno_codes.EFBIG)
_OOM_TEXT = re.compile(
    r"out of memory|can't allocate memory|CUBLAS_STATUS_ALLOC_FAILED|MPS backend out of memory", re.I
)
_NO_ADDRESS_SPACE = re.compile(r"failed to map segment from shared object|cannot allocate memory", re.I)
OOM_HINT = (
    "lower the batch size (train: the phase's batch_size, or train.chunk_size, which bounds what one forward "
    "pass holds; eval/compare: --batch-size; inspect-collapse: --max-rows) or free memory"
)


def _open_files_limit() -> str:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return ""
    return f" (the limit is {soft}; the hard limit {'unlimited' if hard < 0 else hard})"


def environment_fault(error: BaseException) -> TripletctlError | None:
    """A `TripletctlError` line for an exception that is the machine's, not a bug: out of memory (host
    or device), too many open files, a file name too long, a disk full or read-only; else None (a bug:
    its traceback is the report). The CLI's one boundary (cli.main) asks this of whatever escapes a
    command, so every writer and reader gets the same words without a try block of its own."""
    for cause in causes(error):
        if isinstance(cause, TripletctlError):
            return cause
        if isinstance(cause, MemoryError) or type(cause).__name__ == "OutOfMemoryError":
            where = "the device" if type(cause).__name__ == "OutOfMemoryError" else "the host"
            return TripletctlError(f"out of memory on {where} ({one_line(cause, 120)}): {OOM_HINT}")
        if isinstance(cause, RuntimeError) and _OOM_TEXT.search(str(cause)):
            return TripletctlError(f"out of memory ({one_line(cause, 120)}): {OOM_HINT}")
        if isinstance(cause, (ImportError, OSError)) and _NO_ADDRESS_SPACE.search(str(cause)):
            return TripletctlError(
                f"out of memory while loading a library ({one_line(cause, 160)}): the process may not map "
                "enough memory; raise `ulimit -v` (several GB) or free memory"
            )
        if not isinstance(cause, OSError) or cause.errno is None:
            continue
        name = cause.filename or ""
        if cause.errno in _TOO_MANY_FILES:
            return TripletctlError(
                f"too many open files{_open_files_limit()}: raise the limit, e.g. `ulimit -n 4096`, or set "
                "data.tokenizer_workers lower (each worker holds pipes)"
            )
        if cause.errno == errno_codes.ENAMETOOLONG:
            return TripletctlError(
                f"a file name is too long: {one_line(str(name), 120)} (a path component may have at most 255 bytes): "
                "choose a shorter path"
            )
        if cause.errno in _WRITE_ERRNOS:
            return OutputError(f"cannot write {name or 'the output'}: {os.strerror(cause.errno)}")
        if cause.errno in _ENVIRONMENT_ERRNOS:  # permission, I/O error: a read or a write
            return OutputError(f"cannot use {name or 'a file'}: {os.strerror(cause.errno)}")
    return None


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and its causes and contexts (a library often wraps the OSError), each once."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__
