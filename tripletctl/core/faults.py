"""Test-only fault injection: `TRIPLETCTL_FAULT=POINT:N` kills the process with SIGKILL (as `kill -9`
would) the N-th time it reaches `fault_point(POINT)`, at moments a test cannot hit from outside
(half-way through writing or replacing a checkpoint). `POINT:N:INT` (or any other signal name) sends
that signal instead: a Ctrl-C that lands inside a known step however fast the steps run, where one
sent from outside can arrive after the phase has ended. Read once, here; unset, a point costs one
comparison. Points: checkpoint-write, checkpoint-swap, checkpoint-cleanup, step, export-swap (see the callers).
"""

from __future__ import annotations

import os
import signal

_POINT, _, _WHEN = os.environ.get("TRIPLETCTL_FAULT", "").partition(":")
_AT, _, _SIGNAL = _WHEN.partition(":")
_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    if name != _POINT:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(_AT or 1):
        os.kill(os.getpid(), signal.Signals[f"SIG{_SIGNAL or 'KILL'}"])
