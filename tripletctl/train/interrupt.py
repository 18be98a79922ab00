"""Ctrl-C and SIGTERM while training: the first asks for a clean stop, the second stops at once.

`tripletctl train` installs the handlers before anything slow (imports, model, data), so a signal
during start-up is never lost: with Python's default handler the KeyboardInterrupt can be raised
inside some object's `__del__`, where Python swallows it, and the run went on to exit 0. The first
signal only sets a flag: the runner checks it at the end of every step (and while waiting for
data or starting up), writes a checkpoint and exits 130. The second raises `InterruptedTwice` and
exits 130 without a checkpoint; should that exception be swallowed in a `__del__` too, a timer ends
the process after HARD_EXIT_SECONDS anyway.

Handlers can only be installed from the main thread; elsewhere (a test calling `runner.train`
from a thread) the flag simply never gets set. Nothing here imports torch: it must be quick.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from tripletctl.core.exit_codes import EXIT_INTERRUPTED

FIRST_MESSAGE = "stopping after this step with a checkpoint (press Ctrl-C again to stop at once, without one)"
START_MESSAGE = "stopping before the first step (press Ctrl-C again to stop at once)"
SECOND_MESSAGE = "interrupted twice: stopped without writing a checkpoint"
HARD_EXIT_SECONDS = 5.0


class InterruptedTwice(KeyboardInterrupt):
    """The second Ctrl-C / SIGTERM: stop now, without a checkpoint."""


def _say(text: str) -> None:
    """Straight to stderr: safe inside a signal handler, even while rich is drawing a progress bar."""
    try:
        os.write(2, f"\n{text}\n".encode())
    except OSError:
        pass


def _hard_exit() -> None:
    _say(SECOND_MESSAGE)
    os._exit(EXIT_INTERRUPTED)


class StopFlag:
    """Ctrl-C / SIGTERM set this; the training loop stops cleanly at the end of the step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.count = 0
        self.stepping = False  # set by the loop once a step has begun: only then is there a step to finish
        self._previous: dict[int, Any] = {}
        self._hard_exit: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count == 1:
            self.signal = signum
            _say(FIRST_MESSAGE if self.stepping else START_MESSAGE)
            return
        if self._hard_exit is None:
            self._hard_exit = threading.Timer(HARD_EXIT_SECONDS, _hard_exit)
            self._hard_exit.daemon = True
            self._hard_exit.start()
        raise InterruptedTwice

    def settled(self) -> None:
        """The InterruptedTwice reached its handler: the fallback timer is not needed."""
        if self._hard_exit is not None:
            self._hard_exit.cancel()

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
