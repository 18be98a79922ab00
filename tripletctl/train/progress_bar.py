"""Showing a phase's progress: a rich bar on a terminal, plain log lines anywhere else.

Under SLURM, `nohup` or CI, stdout is a file: a live bar there prints nothing until the phase ends,
then one line cut at the console width. So when stdout is not a terminal, each reported step is one
self-contained line, written whole (never wrapped or cut) and flushed at once:

    phase 0 semi-hard step 10/80 loss 0.0663 batch-hard 0.1603 active 0.55 444 samples/s elapsed 0:00:12 eta 0:01:24

`train.log_every` says which steps get a line: every N steps, or `auto` (at least 10 steps *and*
30 s apart, so a fast phase does not flood the log and a slow one is not silent for long). The
first and last step of a phase always get one, and so does the step a run stops at.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

AUTO_MIN_STEPS = 10
AUTO_MIN_SECONDS = 30.0


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """One line per reported step; `clock` is injectable so tests can make time pass."""

    def __init__(
        self,
        console: Console,
        label: str,
        total: int,
        start: int,
        log_every: int | str,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.console, self.label, self.total, self.log_every, self.clock = console, label, total, log_every, clock
        self.started = clock()
        self.first_step = start  # steps done before this invocation (resume) do not count for the rate
        self.last_line_step, self.last_line_time = start, self.started
        self.samples_since_line = 0

    def due(self, step: int, final: bool) -> bool:
        """Whether `step` (1-based, within the phase) gets a line."""
        if final or step == self.first_step + 1 or step >= self.total:
            return True
        if self.log_every == "auto":
            return (
                step - self.last_line_step >= AUTO_MIN_STEPS and self.clock() - self.last_line_time >= AUTO_MIN_SECONDS
            )
        return step % int(self.log_every) == 0

    def update(self, step: int, record: dict, batch_size: int, final: bool = False, until: str | None = None) -> None:
        self.samples_since_line += batch_size
        if not self.due(step, final):
            return
        now = self.clock()
        elapsed = now - self.started
        rate = self.samples_since_line / max(now - self.last_line_time, 1e-9)
        per_step = elapsed / max(step - self.first_step, 1)
        eta = per_step * (self.total - step)
        line = (
            f"{self.label} step {step}/{self.total} loss {record['loss']:.4f} "
            f"batch-hard {record['batch_hard_loss']:.4f} active {record['active_fraction']:.2f} "
            f"{rate:.0f} samples/s elapsed {_clock(elapsed)} eta {_clock(eta)}" + (f" until {until}" if until else "")
        )
        self.console.out(line, highlight=False)  # `out` neither wraps nor crops; rich flushes each write
        self.last_line_step, self.last_line_time, self.samples_since_line = step, now, 0

    def print(self, message: str) -> None:
        """A message between progress lines (e.g. a collapse warning), unwrapped like them."""
        self.console.print(message, soft_wrap=True)

    def stop(self) -> None:
        pass


class BarProgress:
    """The live rich bar, for a terminal."""

    def __init__(self, console: Console, label: str, total: int, start: int, until: str | None = None):
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]:.4f} hardest {task.fields[hardest]:.4f} "
                "active {task.fields[active]:.2f} {task.fields[rate]:.0f} samples/s"
            ),
            TimeRemainingColumn(),
        ]
        if until is not None:  # the phase's `until:` signals against their thresholds
            columns.insert(4, TextColumn("until {task.fields[until]}"))
        self.bar = Progress(*columns, console=console)
        self.bar.start()
        self.task = self.bar.add_task(
            label,
            total=total,
            completed=start,
            loss=float("nan"),
            hardest=float("nan"),
            active=float("nan"),
            rate=0.0,
            until=until or "",
        )

    def update(self, step: int, record: dict, batch_size: int, final: bool = False, until: str | None = None) -> None:
        self.bar.update(
            self.task,
            completed=step,
            loss=record["loss"],
            hardest=record["batch_hard_loss"],
            active=record["active_fraction"],
            rate=record["samples_per_s"] or 0.0,
            until=until or "",
        )

    def print(self, message: str) -> None:
        self.bar.console.print(message)

    def stop(self) -> None:
        self.bar.stop()


class NoProgress:
    """Ranks other than the main one show nothing."""

    def update(self, step: int, record: dict, batch_size: int, final: bool = False, until: str | None = None) -> None:
        pass

    def print(self, message: str) -> None:
        pass

    def stop(self) -> None:
        pass


def phase_progress(
    console: Console,
    label: str,
    total: int,
    start: int,
    log_every: int | str,
    show: bool = True,
    until: str | None = None,
) -> PlainProgress | BarProgress | NoProgress:
    """The display that suits where stdout goes; `until` is the first text of the until column."""
    if not show:
        return NoProgress()
    if console.is_terminal:
        return BarProgress(console, label, total, start, until)
    return PlainProgress(console, label, total, start, log_every)
