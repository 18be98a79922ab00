"""The run's state and outcomes: `RunProgress` (what state.json holds), `Run` (what every phase of
one invocation shares), `PhaseEnd` and `PhaseOutcome` (how a phase ended), mapped to exit codes once."""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tripletctl.config.blocks import Curriculum, PhaseConfig
from tripletctl.core.errors import CheckpointError
from tripletctl.core.exit_codes import EXIT_COLLAPSE_STOP, EXIT_DONE, EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_WORKER_DIED
from tripletctl.train.distributed import DistContext
from tripletctl.train.interrupt import StopFlag
from tripletctl.train.memory import EmbeddingMemory
from tripletctl.train.trackers import Trackers


class PhaseEnd(enum.Enum):
    """Why `run_phase` returned: what happened to the phase, not how the process exits (`EXIT_CODE_OF_END`).
    The value is the phase's status in run.json when it stopped the run."""

    DONE = "done"  # every planned step done, or an `until:` condition ended it
    PAUSED = "paused"  # the step budget of this invocation (--max-steps) is spent: resume later
    INTERRUPTED = "interrupted"  # Ctrl-C / SIGTERM
    COLLAPSED = "stopped (collapse)"  # the collapse watchdog, on_collapse: stop
    NONFINITE = "stopped (non-finite)"  # a non-finite loss, gradient or weight
    DIVERGED = "stopped (diverged)"  # finite weights that jumped (train.divergence_factor)
    WORKER_DIED = "stopped (worker died)"  # a tokenizer worker process died

    def status(self, phase_finished: bool) -> str:
        """The phase's status in run.json once `run_phase` returned."""
        if self in (PhaseEnd.DONE, PhaseEnd.PAUSED):
            return "done" if phase_finished else "paused"
        return self.value


# The one place a phase's end becomes the exit code of `train`.
EXIT_CODE_OF_END = {
    PhaseEnd.DONE: EXIT_DONE,
    PhaseEnd.PAUSED: EXIT_DONE,
    PhaseEnd.INTERRUPTED: EXIT_INTERRUPTED,
    PhaseEnd.COLLAPSED: EXIT_COLLAPSE_STOP,
    PhaseEnd.NONFINITE: EXIT_NONFINITE,
    PhaseEnd.DIVERGED: EXIT_NONFINITE,
    PhaseEnd.WORKER_DIED: EXIT_WORKER_DIED,
}


@dataclass
class RunProgress:
    """Where the run stands; saved in every checkpoint's state.json."""

    phase_index: int = 0
    step: int = 0  # optimiser steps done in the current phase
    global_step: int = 0
    samples_seen: int = 0
    mining_override: str | None = None  # set by on_collapse: fallback
    watchdog: dict = field(default_factory=dict)
    conditions: dict = field(default_factory=dict)  # the phase's `until:` state (conditions.ConditionState)
    eval_history: list = field(default_factory=list)
    phase_ends: dict = field(default_factory=dict)  # str(phase index) -> steps planned/done, why it ended
    nonfinite_skipped: int = 0  # steps dropped by on_nonfinite: skip, whole run
    nonfinite_streak: int = 0  # ... in a row, now (stop after train.max_nonfinite_skips)

    def start_phase(self, index: int) -> None:
        """Counters and per-phase state for the first step of phase `index`."""
        self.phase_index, self.step, self.mining_override, self.watchdog = index, 0, None, {}
        self.conditions = {}
        self.nonfinite_streak = 0

    def phase_finished(self, phase: PhaseConfig) -> bool:
        """The current phase has ended: all its steps done, or an `until:` condition ended it."""
        return str(self.phase_index) in self.phase_ends or self.step >= phase.steps

    @classmethod
    def from_state(cls, state: dict, where: Path) -> RunProgress:
        """The progress a checkpoint's state.json holds, every field type-checked: a mistyped file is
        one clear error here rather than a TypeError somewhere in the loop."""
        hints = typing.get_type_hints(cls)  # `str | None` -> (str, NoneType); the fields are the schema
        kinds = {f.name: typing.get_args(hints[f.name]) or hints[f.name] for f in dataclasses.fields(cls)}
        values = {}
        for key, kind in kinds.items():
            if key not in state:
                continue
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value < 0):
                raise CheckpointError(f"{where / 'state.json'} is damaged: {key} is {value!r}")
            values[key] = value
        for key in ("phase_index", "step", "global_step"):
            if key not in values:
                raise CheckpointError(f"{where / 'state.json'} is damaged: it has no {key}")
        return cls(**values)


@dataclass(frozen=True)
class Run:
    """What every phase of one `train` invocation shares; `_train` builds it once."""

    curriculum: Curriculum
    model: torch.nn.Module  # the bare TripletEncoder: saved, evaluated, its parameters stepped
    train_model: torch.nn.Module  # the same model, possibly wrapped in DDP: the forward passes
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    ctx: DistContext
    console: Console
    stop: StopFlag
    trackers: Trackers
    eval_rows: Any = None  # the held-out rows (data.LabelledRows); None without an eval block
    stop_at_global_step: int | None = None  # --max-steps: pause once the run's step count reaches it
    on_eval: Callable[[dict], None] | None = None  # sees each held-out eval on the main process (keeps the best)


@dataclass
class PhaseOutcome:
    end: PhaseEnd
    stream_state: dict | None
    reason: str | None = None  # what stopped the phase, for the closing line
    memory: EmbeddingMemory | None = None  # the cross-batch memory, for the next phase
