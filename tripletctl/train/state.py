"""What the training loop holds: `RunProgress` (where the run stands; what state.json holds), `Run`
(what every phase of one invocation shares), `OpenPhase` (one phase's working objects while
`run_phase` runs it), `StepResult` and `Agreed` (one step's numbers, and what every rank decided on
them). How a phase ends is phase_end.py's."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tripletctl.config.blocks import Curriculum, PhaseConfig
from tripletctl.core.errors import CheckpointError
from tripletctl.data.stream import BatchStream
from tripletctl.model.chunking import Chunking, ChunkPlan
from tripletctl.outputs.metrics_log import MetricsLog
from tripletctl.train import conditions, mining
from tripletctl.train.class_centroids import ClassCentroids
from tripletctl.train.distributed import DistContext
from tripletctl.train.divergence import DivergenceDetector
from tripletctl.train.interrupt import StopFlag
from tripletctl.train.memory import EmbeddingMemory
from tripletctl.train.mined_negatives import MinedTable
from tripletctl.train.trackers import Trackers
from tripletctl.train.watchdog import CollapseWatchdog


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

    def count_step(self, batch_size: int) -> None:
        """One optimiser step done."""
        self.step += 1
        self.global_step += 1
        self.samples_seen += batch_size

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
    centroids: ClassCentroids | None = None  # class centroids, when some phase has batch_classes: neighbours
    resumed_mined: MinedTable | None = None  # the checkpoint's mined_negatives table, for its open phase


@dataclass
class OpenPhase:
    """One phase's working objects while `run_phase` runs it."""

    index: int
    config: PhaseConfig
    directory: Path
    log: MetricsLog
    stream: BatchStream
    chunking: Chunking
    autocast_dtype: torch.dtype | None
    watchdog: CollapseWatchdog
    until_state: conditions.ConditionState
    divergence: DivergenceDetector
    memory: EmbeddingMemory | None
    gather: Callable | None  # all-gather with gradients under torchrun
    no_sync: Callable | None  # DDP's no_sync under torchrun
    last_state: dict | None  # the stream's state after the last batch consumed
    bar: Any = None  # the progress display (progress_bar.py)
    mined: MinedTable | None = None  # mined_negatives: the rows each class of a batch brings

    def close(self) -> None:
        """The progress display, the stream (its tokenizer workers) and the metrics file."""
        self.bar.stop()
        self.stream.close()
        self.log.close()


@dataclass
class StepResult:
    """What embed -> mine -> backward gave for one batch (the gradients are in the model)."""

    loss: float
    stats: mining.MiningStats
    plan: ChunkPlan
    mined: list  # [(embeddings, labels)] mined over: they join the cross-batch memory if the step is used
    grad_norm: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


@dataclass
class Agreed:
    """The per-step decision every rank shares, from one all-reduce."""

    rows_seen: int
    rows_skipped: int
    classes_evicted: int
    stop_now: bool  # Ctrl-C/SIGTERM reached some rank
    collapsed: bool  # the collapse watchdog fired on some rank
    nonfinite: bool  # a NaN/inf loss or gradient on some rank
    diverging: bool  # a loss or gradient norm jump (divergence.py) on some rank
    signals: dict[str, float]  # what `until:` conditions read, averaged over the ranks
