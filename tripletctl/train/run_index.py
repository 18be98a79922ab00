"""What OUTPUT/run.json and each phase's summary.json say (outputs/run_file.py reads and writes the
file), kept true by the main process at every change of the run.
Also the best model kept on held-out evals (`train.keep_best`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tripletctl.config.blocks import Curriculum, curriculum_to_dict
from tripletctl.core.errors import TripletctlError
from tripletctl.core.jsonio import write_json_atomic
from tripletctl.outputs import best
from tripletctl.outputs.checkpoint_find import phase_dir as phase_dir_of
from tripletctl.outputs.metrics_log import MetricsLog
from tripletctl.outputs.run_file import read_run, run_file, write_run
from tripletctl.train.distributed import DistContext
from tripletctl.train.held_out import eval_line, evaluate_held_out
from tripletctl.train.interrupt import StopFlag
from tripletctl.train.state import RunProgress


def summary_path(curriculum: Curriculum, index: int) -> Path:
    return phase_dir_of(curriculum.train.output_dir, index, curriculum.phases[index].name) / "summary.json"


def write_phase_summary(
    curriculum: Curriculum, index: int, started: float | None, progress: RunProgress | None = None
) -> None:
    """OUTPUT/phase-K-NAME/summary.json, rewritten whole from the phase's own metrics file."""
    write_json_atomic(summary_path(curriculum, index), phase_summary(curriculum, index, started, progress))


def phase_summary(
    curriculum: Curriculum, index: int, started: float | None, progress: RunProgress | None = None
) -> dict:
    """Summarise a phase from its own metrics file, so the summary is true after a resume too."""
    phase = curriculum.phases[index]
    phase_dir = phase_dir_of(curriculum.train.output_dir, index, phase.name)
    steps, evals, collapses, nonfinite = [], [], [], []
    for record in MetricsLog(phase_dir).records():
        kind = record.get("event")
        if kind is None:
            steps.append(record)
        elif kind in ("eval", "collapse", "nonfinite"):
            {"eval": evals, "collapse": collapses, "nonfinite": nonfinite}[kind].append(record)
    tail = steps[-max(1, len(steps) // 10) :] if steps else []

    def mean(key: str, records: list) -> float | None:
        values = [r[key] for r in records if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    end = progress.phase_ends.get(str(index), {}) if progress is not None else {}
    return {
        "index": index,
        "name": phase.name,
        "mining": phase.mining,
        "batch_size": phase.batch_size,
        "margin": phase.margin,
        "steps": phase.steps,
        "steps_planned": phase.steps,
        "steps_done": len(steps),
        "ended_by": end.get("ended_by"),
        "end_reason": end.get("reason"),
        "first_loss": steps[0]["loss"] if steps else None,
        "first_batch_hard_loss": steps[0]["batch_hard_loss"] if steps else None,
        "final_loss": mean("loss", tail),
        "final_batch_hard_loss": mean("batch_hard_loss", tail),
        "final_active_fraction": mean("active_fraction", tail),
        "final_embedding_spread": mean("embedding_spread", tail),
        "mean_samples_per_s": mean("samples_per_s", steps),
        "rows_skipped": steps[-1]["rows_skipped"] if steps else 0,
        "classes_evicted": steps[-1]["classes_evicted"] if steps else 0,
        "collapse_events": len(collapses),
        "nonfinite_steps": len(nonfinite),
        "eval": evals[-1] if evals else None,
        "wall_seconds": time.time() - started if started is not None else None,
    }


def start_run_index(
    index: RunIndex,
    model: torch.nn.Module,
    tokenizer: Any,
    eval_rows: Any,
    closed_phase: int | None,
    stop: StopFlag,
    say: Callable[[str], None] = lambda line: None,
) -> None:
    """run.json at start-up (main process): what an earlier invocation recorded (start time, the
    untrained eval) kept, a closed phase's missing summary written, the untrained eval (said before
    it starts, it can take minutes, and its numbers after), the best model."""
    curriculum = index.curriculum
    output = Path(curriculum.train.output_dir)
    saved = read_run(output)
    if saved is not None:
        index.extra = {k: v for k, v in saved.items() if k in ("eval_untrained", "started")}
    else:
        index.extra = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if closed_phase is not None and not summary_path(curriculum, closed_phase).exists():
        write_phase_summary(curriculum, closed_phase, None, index.progress)  # killed before writing it
    if eval_rows is not None and "eval_untrained" not in index.extra and not stop.requested:
        say(f"evaluating the untrained model on {len(eval_rows.texts):,} held-out texts ...")
        index.extra["eval_untrained"] = evaluate_held_out(model, tokenizer, eval_rows, curriculum, index.ctx.device)
        say(eval_line(index.extra["eval_untrained"], "untrained"))
    kept = best.read_best(output) if curriculum.train.keep_best else None
    if kept is not None:
        index.extra["best"] = kept
    index.write()


def keep_best(index: RunIndex, model: torch.nn.Module, tokenizer: Any, event: dict) -> None:
    """A new held-out best replaces OUTPUT/best at once, and run.json names it."""
    curriculum = index.curriculum
    record = best.offer(
        Path(curriculum.train.output_dir),
        curriculum.train.keep_best,
        event,
        model=model,
        tokenizer=tokenizer,
        curriculum=curriculum_to_dict(curriculum),
    )
    if record is not None:
        event["new_best"] = True
        index.extra["best"] = record
        index.write()


@dataclass
class RunIndex:
    """OUTPUT/run.json: the phases with their status and steps, plus what the run adds (`extra`: start
    time, untrained and final held-out evals, the best model, an error). Rewritten whole at each change,
    by the main process only."""

    curriculum: Curriculum
    ctx: DistContext
    progress: RunProgress
    status: dict[int, str] = field(default_factory=dict)  # phase index -> done/running/paused/stopped (...)
    extra: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return run_file(self.curriculum.train.output_dir)

    def all_done(self) -> bool:
        return all(s == "done" for s in self.status.values()) and len(self.status) == len(self.curriculum.phases)

    def write(self, with_progress: bool = True) -> None:
        if self.ctx.is_main:
            write_run(self.curriculum.train.output_dir, self.as_dict(self.progress if with_progress else None))

    def record_failure(self, error: BaseException) -> None:
        """Best effort (the disk may be the problem): the running phase becomes `interrupted` or
        `failed`, and run.json says why."""
        interrupted = isinstance(error, KeyboardInterrupt)
        for index, value in self.status.items():
            if value == "running":
                self.status[index] = "interrupted" if interrupted else "failed"
        if not interrupted:
            self.extra["error"] = (
                str(error) if isinstance(error, TripletctlError) else f"{type(error).__name__}: {error}"
            )
        try:
            self.write(with_progress=False)
        except Exception:
            pass

    def as_dict(self, progress: RunProgress | None) -> dict:
        output = Path(self.curriculum.train.output_dir)

        def steps_done(index: int) -> int | None:
            if progress is None:
                return None
            if str(index) in progress.phase_ends:
                return progress.phase_ends[str(index)]["steps_done"]
            return progress.step if index == progress.phase_index else 0

        def ended(index: int) -> dict:
            end = progress.phase_ends.get(str(index), {}) if progress is not None else {}
            return {"ended_by": end.get("ended_by"), "end_reason": end.get("reason")}

        return {
            "curriculum": str(self.curriculum.path),
            "output_dir": str(output),
            "world_size": self.ctx.world_size,
            "phases": [
                {
                    "index": i,
                    "name": p.name,
                    "dir": phase_dir_of(output, i, p.name).name,
                    "mining": p.mining,
                    "batch_size": p.batch_size,
                    "margin": p.margin,
                    "steps": p.steps,
                    "steps_planned": p.steps,
                    "steps_done": steps_done(i),
                    **ended(i),
                    "status": self.status.get(i, "pending"),
                }
                for i, p in enumerate(self.curriculum.phases)
            ],
            **self.extra,
        }
