"""The CLI's one boundary for faults of the machine, around every command (`cli.main`).

Out of memory (host or device), too many open files, a file name too long, a full or read-only disk
(standard output included: `eval --json > full/disk/eval.json`), and under torchrun a peer rank
that died: whatever escapes a command as one of these is one line, with what to change, and its
exit code (2; a lost peer 5, resumable like a dead tokenizer worker). Anything else is a bug and
keeps its traceback (exit 1). The words live in `core/errors.py` `environment_fault`, so every
reader and writer gets them without a try block of its own.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from tripletctl.core.errors import TripletctlError, environment_fault, one_line
from tripletctl.core.exit_codes import EXIT_WORKER_DIED
from tripletctl.core.launcher import command_line, rank_prefix, under_torchrun

# What gloo / NCCL / the TCP store say when another rank's process is gone.
_PEER_LOST = re.compile(
    r"Connection reset by peer|Connection closed by peer|Broken pipe|Socket Timeout|"
    r"remote process exited|NCCL communicator was aborted|ProcessGroupNCCL.*(?:abort|timeout)|DistNetworkError",
    re.I,
)


class PeerLostError(TripletctlError):
    """Another rank of the torchrun group died (killed, out of memory): this rank stops too."""

    exit_code = EXIT_WORKER_DIED


def run_guarded(app: Any, err_console: Any) -> None:
    """Run the Typer app; turn a fault of the machine into its one line and exit code."""
    try:
        try:
            app()
        finally:
            _flush_stdout()  # `eval --json > full/disk`: the write fails here, not at exit
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as error:
        if isinstance(error, OSError) and not error.filename and _raised_by_print(error):
            error = OSError(error.errno, error.strerror, "standard output")
        fault = peer_lost(error) or environment_fault(error)
        if fault is None:
            raise
        _exit_with(fault, err_console)


def peer_lost(error: BaseException) -> PeerLostError | None:
    """Under torchrun, a collective that failed because a peer rank is gone; else None."""
    if not under_torchrun():
        return None
    text = f"{type(error).__name__}: {error}"
    if type(error).__name__ not in ("DistBackendError", "DistNetworkError") and not _PEER_LOST.search(text):
        return None
    arguments = sys.argv[1:]
    hint = ""
    if arguments[:1] == ["train"]:
        again = [a for a in arguments[1:] if a != "--resume"]
        hint = f"; the last complete checkpoint is kept: continue with `{command_line(['train', *again, '--resume'])}`"
    return PeerLostError(
        f"lost a peer rank of the torchrun group ({one_line(error, 120)}): another rank died (killed, out of "
        f"memory, its machine gone) and this one stops too{hint}"
    )


def _raised_by_print(error: BaseException) -> bool:
    """Whether the innermost line of ours that raised `error` prints (stdout has no file name)."""
    ours = [f for f in traceback.extract_tb(error.__traceback__) if "tripletctl" in Path(f.filename).parts]
    line = (ours[-1].line or "") if ours else ""
    return line.startswith("print(") or "console.print(" in line or "_flush_stdout()" in line


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except OSError as error:  # it has no file name of its own: say which output it is
        raise OSError(error.errno, error.strerror, "standard output") from error


def _exit_with(fault: TripletctlError, err_console: Any) -> None:
    """Print the fault's line and end the process now: stdout may hold output that can never be
    written (a full disk), which Python would otherwise report again, with a traceback, at exit;
    a torchrun rank's process group would wait on its peers."""
    try:
        err_console.print(f"[bold red]error:[/] {rank_prefix()}", end="")
        err_console.print(str(fault), highlight=False, soft_wrap=True, markup=False)
        sys.stderr.flush()
    finally:
        os._exit(fault.exit_code)
