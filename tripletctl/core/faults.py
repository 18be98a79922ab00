"""Test-only fault injection: `TRIPLETCTL_FAULT=POINT:N` kills the process with SIGKILL (as `kill -9`
would) the N-th time it reaches `fault_point(POINT)`, at moments a test cannot hit from outside
(half-way through writing or replacing a checkpoint). `POINT:N:INT` (or any other signal name) sends
that signal instead: a Ctrl-C that lands inside a known step however fast the steps run, where one
sent from outside can arrive after the phase has ended. `POINT:N:ENOSPC` (any errno name) raises that
OSError there instead, and `POINT:N:MemoryError` / `POINT:N:DeviceOOM` a host or device out-of-memory
error (torch's text): the faults of a full disk, too many open files or too little memory, where the
machine cannot be made to have them. `TRIPLETCTL_FAULT_RANK=R` limits the fault to torchrun's rank R
(a lost peer). Read once, here; unset, a point costs one comparison. Points:
checkpoint-write, checkpoint-swap, checkpoint-cleanup, step, export-swap, plot-write (see the callers).
"""

from __future__ import annotations

import errno
import os
import signal

_POINT, _, _WHEN = os.environ.get("TRIPLETCTL_FAULT", "").partition(":")
if os.environ.get("TRIPLETCTL_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
    _POINT = ""  # another rank's fault
_AT, _, _SIGNAL = _WHEN.partition(":")
_reached: dict[str, int] = {}


def fault_point(name: str, path: str | None = None) -> None:
    """`path`: the file an injected OSError names (as the real one would)."""
    if name != _POINT:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != int(_AT or 1):
        return
    if _SIGNAL == "MemoryError":
        raise MemoryError("injected by TRIPLETCTL_FAULT")
    if _SIGNAL == "DeviceOOM":  # what torch.OutOfMemoryError says (a RuntimeError)
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by TRIPLETCTL_FAULT)")
    code = getattr(errno, _SIGNAL, None) if _SIGNAL.startswith("E") else None
    if code is not None:
        raise OSError(code, os.strerror(code), path)
    os.kill(os.getpid(), signal.Signals[f"SIG{_SIGNAL or 'KILL'}"])
