"""`train`: set up (setup.py), evaluate the untrained model, run the phases in order (loop.py), keep
run.json and the summaries true (run_index.py) and report (report.py). Returns the exit code."""

from __future__ import annotations

import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tripletctl.config.blocks import Curriculum, curriculum_to_dict
from tripletctl.core.exit_codes import EXIT_CRASH, EXIT_DONE, EXIT_INTERRUPTED
from tripletctl.data.sources import check_source, read_rows
from tripletctl.outputs.lock import claim_run_dir
from tripletctl.outputs.rng import restore_rng
from tripletctl.train.class_centroids import for_run
from tripletctl.train.distributed import DistContext, barrier, cleanup, init_distributed, wrap_model
from tripletctl.train.interrupt import StopFlag
from tripletctl.train.loop import run_phase
from tripletctl.train.phase_end import EXIT_CODE_OF_END, PhaseEnd
from tripletctl.train.report import interrupted_during_start_up, print_outcome
from tripletctl.train.run_index import RunIndex, keep_best, start_run_index, write_phase_summary
from tripletctl.train.setup import Resumed, build_run_model, check_before_start, load_resume, prepare_output
from tripletctl.train.state import Run
from tripletctl.train.trackers import Trackers, open_trackers, require_installed


def train(
    curriculum: Curriculum,
    resume: bool = False,
    console: Console | None = None,
    max_steps: int | None = None,
    stop: StopFlag | None = None,
    command: list[str] | None = None,
) -> int:
    """Run the curriculum's phases in order. Returns the process exit code.

    `max_steps` stops after that many optimiser steps in this invocation (checkpointed), for
    time-boxed jobs; `--resume` continues exactly where it stopped. `stop` is the Ctrl-C/SIGTERM
    flag, installed by the CLI before start-up; without one, `train` installs its own. `command` is
    the curriculum and overrides as typed, repeated in the hint that says how to resume.
    """
    console = console or Console()
    require_installed(curriculum.train.report_to)  # before any work: a missing extra is one line
    if stop is None:
        with StopFlag() as own:
            return train(curriculum, resume, console, max_steps, own, command)
    ctx = init_distributed(curriculum.train.device)
    try:  # one writer per output directory: held before anything there is read, cleaned or written
        with claim_run_dir(curriculum.train.output_dir) if ctx.is_main else nullcontext():
            return _train(curriculum, resume, console, max_steps, ctx, stop, command or [str(curriculum.path)])
    finally:
        cleanup(ctx)


def _train(
    curriculum: Curriculum,
    resume: bool,
    console: Console,
    max_steps: int | None,
    ctx: DistContext,
    stop: StopFlag,
    command: list[str],
) -> int:
    train_cfg = curriculum.train
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # 1. fail on bad input before any work starts
    previous = check_before_start(curriculum, resume)
    check_source(curriculum.data)
    if curriculum.eval is not None:  # its columns too, before anything is written to the output directory
        check_source(curriculum.eval)
    if ctx.is_main:  # a read-only or full output directory fails here, before the model is built
        prepare_output(curriculum)
    if stop.requested:
        return interrupted_during_start_up(console, curriculum, previous, command)
    # 2. the model and optimiser, then what the checkpoint holds
    model, tokenizer, optimizer = build_run_model(curriculum, ctx)
    resumed = load_resume(curriculum, previous, model, optimizer, ctx, console) if resume else Resumed()
    train_model = wrap_model(model, ctx)
    if stop.requested:
        return interrupted_during_start_up(console, curriculum, previous, command)
    # 3. held-out rows, trackers, run.json (with the untrained model's eval)
    eval_rows, trackers, index = _start_records(curriculum, ctx, resume, resumed, model, tokenizer, stop, console)
    barrier(ctx)
    if stop.requested:
        return interrupted_during_start_up(console, curriculum, previous, command)
    # 4. the phases
    run = Run(
        curriculum=curriculum,
        model=model,
        train_model=train_model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        ctx=ctx,
        console=console,
        stop=stop,
        trackers=trackers,
        eval_rows=eval_rows,
        stop_at_global_step=resumed.progress.global_step + max_steps if max_steps is not None else None,
        on_eval=partial(keep_best, index, model, tokenizer) if train_cfg.keep_best else None,
        centroids=for_run(curriculum.phases, curriculum.data.neighbour_refresh, ctx.device, resumed.centroids),
        resumed_mined=resumed.mined,
    )
    if resumed.rng is not None:
        restore_rng(resumed.rng)  # last, so nothing above consumes random numbers after the restore
    return run_phases(run, index, resumed, command)


def _start_records(
    curriculum: Curriculum,
    ctx: DistContext,
    resume: bool,
    resumed: Resumed,
    model: torch.nn.Module,
    tokenizer: Any,
    stop: StopFlag,
    console: Console,
) -> tuple[Any, Trackers, RunIndex]:
    """The held-out rows, the trackers (opened before the first eval: a tracker that cannot start its
    run fails early) and run.json with the untrained model's eval, which the trackers get as step 0."""
    train_cfg = curriculum.train
    eval_rows = None
    if curriculum.eval is not None:
        eval_rows = read_rows(curriculum.eval, limit=curriculum.eval.max_rows)
    trackers = Trackers()
    if ctx.is_main:
        trackers = open_trackers(
            train_cfg.report_to,
            Path(train_cfg.output_dir),
            curriculum_to_dict(curriculum),
            console=console,
            resume_step=resumed.progress.global_step if resume else None,
        )
    index = RunIndex(curriculum, ctx, resumed.progress, {i: "done" for i in range(resumed.progress.phase_index)})
    if ctx.is_main:
        start_run_index(index, model, tokenizer, eval_rows, resumed.closed_phase, stop, say=partial(_say, console))
    if ctx.is_main and not resume and index.extra.get("eval_untrained"):  # step 0 of the first phase's eval
        trackers.log(
            {"event": "eval", "global_step": 0, "phase": curriculum.phases[0].name, **index.extra["eval_untrained"]}
        )
    return eval_rows, trackers, index


def _say(console: Console, line: str) -> None:
    console.print(line, highlight=False, soft_wrap=True, markup=False)


def run_phases(run: Run, index: RunIndex, resumed: Resumed, command: list[str]) -> int:
    """Run the phases from where the run stands, keeping run.json and each phase's summary.json
    current; the first phase that does not end DONE ends the invocation. Returns the exit code."""
    curriculum, progress = run.curriculum, resumed.progress
    stream_state, memory = resumed.stream_state, resumed.memory
    exit_code, reason = EXIT_DONE, None
    try:
        for phase_index in range(progress.phase_index, len(curriculum.phases)):
            phase = curriculum.phases[phase_index]
            started = time.time()
            index.status[phase_index] = "running"
            index.write()
            outcome = run_phase(run, phase_index, progress, stream_state, memory)
            stream_state = outcome.stream_state  # the next phase continues the stream, never restarts it
            memory = outcome.memory
            phase_done = progress.phase_finished(phase)
            if run.ctx.is_main:
                write_phase_summary(curriculum, phase_index, started, progress)
            index.status[phase_index] = outcome.end.status(phase_done)
            if outcome.end is not PhaseEnd.DONE:
                exit_code, reason = EXIT_CODE_OF_END[outcome.end], outcome.reason
                break
            if phase_index + 1 < len(curriculum.phases):
                progress.start_phase(phase_index + 1)
        if index.all_done() and run.eval_rows is not None:
            index.extra["eval_final"] = progress.eval_history[-1] if progress.eval_history else None
        index.write()
    except BaseException as error:  # run.json must not say "running" for a run that is gone
        run.trackers.close(EXIT_INTERRUPTED if isinstance(error, KeyboardInterrupt) else EXIT_CRASH)
        index.record_failure(error)
        raise
    if run.ctx.is_main:
        run.trackers.close(exit_code)
        print_outcome(run.console, curriculum, index.status, index.extra, exit_code, command, reason)
    return exit_code
