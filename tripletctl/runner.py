"""The phase runner: one explicit loop per phase, embed -> mine -> loss -> step -> log -> checkpoint.

Read `run_phase` top to bottom to know exactly what a training step does. `train` only sets up
the model, optimiser and output directory, runs the phases in order and evaluates around them.
"""

from __future__ import annotations

import enum
import json
import math
import random
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tripletctl import best, conditions, mining
from tripletctl.checkpoint import (
    CHECKPOINT,
    capture_rng,
    clean_leftovers,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from tripletctl.checkpoint import phase_dir as phase_dir_of
from tripletctl.chunking import Chunking, ChunkPlan, embed_and_backward, plan_chunks, resolve_chunking
from tripletctl.collapse import CollapseWatchdog
from tripletctl.curriculum import Curriculum, PhaseConfig, curriculum_to_dict
from tripletctl.distributed import (
    DistContext,
    all_reduce_sums,
    barrier,
    broadcast_object,
    check_world_size,
    cleanup,
    gather_labels,
    gather_object,
    gather_with_grad,
    init_distributed,
    local_batch_size,
    no_sync_for,
    wrap_model,
)
from tripletctl.errors import CheckpointError, ConfigError, TripletctlError, WorkerDiedError, writing
from tripletctl.evaluation import evaluate_model
from tripletctl.faults import fault_point
from tripletctl.interrupt import StopFlag
from tripletctl.jsonio import replace_text, write_json_atomic
from tripletctl.memory import EmbeddingMemory, carry_over
from tripletctl.metrics_log import MetricsLog
from tripletctl.model import build_model
from tripletctl.progress import phase_progress
from tripletctl.sources import check_source, read_rows
from tripletctl.stream import BatchStream, StreamInterrupted, pad_ragged
from tripletctl.trackers import Trackers, open_trackers, require_installed

# Exit codes of `train` (the table in README.md and `train --help`).
EXIT_DONE = 0  # done, or paused by --max-steps
EXIT_CRASH = 1  # an unexpected crash only (Python's own code for an uncaught exception)
EXIT_BAD_INPUT = 2  # bad input, damaged file, environment fault (TripletctlError.exit_code)
EXIT_COLLAPSE_STOP = 3  # stopped by the collapse watchdog (on_collapse: stop)
EXIT_NONFINITE = 4  # a non-finite loss or gradient (on_nonfinite): the last good checkpoint is kept
EXIT_WORKER_DIED = 5  # a tokenizer worker process died: checkpoint written, resumable (WorkerDiedError)
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM (tripletctl.interrupt)


class PhaseEnd(enum.Enum):
    """Why `run_phase` returned: what happened to the phase, not how the process exits (`EXIT_CODE_OF_END`).
    The value is the phase's status in run.json when it stopped the run."""

    DONE = "done"  # every planned step done, or an `until:` condition ended it
    PAUSED = "paused"  # the step budget of this invocation (--max-steps) is spent: resume later
    INTERRUPTED = "interrupted"  # Ctrl-C / SIGTERM
    COLLAPSED = "stopped (collapse)"  # the collapse watchdog, on_collapse: stop
    NONFINITE = "stopped (non-finite)"  # a non-finite loss, gradient or weight
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
    PhaseEnd.WORKER_DIED: EXIT_WORKER_DIED,
}


def get_lr(step: int, phase: PhaseConfig, decay: str) -> float:
    """Learning rate at `step` (0-based) of a phase: linear warm-up, then `decay` to 0 at the end.

    Pure, like nanoGPT's get_lr: resume needs no scheduler state, only the step counter.
    """
    if phase.warmup_steps > 0 and step < phase.warmup_steps:
        return phase.lr * (step + 1) / phase.warmup_steps
    if decay == "none":
        return phase.lr
    decay_steps = max(1, phase.steps - phase.warmup_steps)
    progress = min(1.0, (step - phase.warmup_steps) / decay_steps)
    if decay == "linear":
        return phase.lr * (1.0 - progress)
    return phase.lr * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


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
        kinds = {
            "phase_index": int,
            "step": int,
            "global_step": int,
            "samples_seen": int,
            "mining_override": (str, type(None)),
            "watchdog": dict,
            "conditions": dict,
            "eval_history": list,
            "phase_ends": dict,
            "nonfinite_skipped": int,
            "nonfinite_streak": int,
        }
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


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _clean_stale_files(output: Path) -> None:
    """Start-up: remove what killed runs left behind (`*.tmp-PID` files, checkpoint tmp/trash
    directories, a superseded `checkpoint.prev`); none of it is ever read."""
    for directory in (output, *(d for d in output.glob("phase-*") if d.is_dir())):
        for stale in directory.glob("*.tmp-*"):
            if stale.is_file():
                stale.unlink(missing_ok=True)
        if directory != output:
            clean_leftovers(directory / CHECKPOINT)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _evaluate(model: torch.nn.Module, tokenizer: Any, rows: Any, curriculum: Curriculum, device: torch.device) -> dict:
    """Retrieval metrics on the held-out rows, without disturbing the training RNG (so a resumed
    run draws what an uninterrupted one would); `encode` restores the train/eval mode itself."""
    rng = capture_rng()
    try:
        return evaluate_model(
            model,
            tokenizer,
            rows,
            batch_size=curriculum.eval.batch_size,
            max_length=curriculum.data.max_length,
            device=device,
        )
    finally:
        restore_rng(rng)


def _mining_loss(mined: list, **mine_kwargs: Any) -> Callable:
    """The loss of the whole (global) batch for `embed_and_backward`; it also keeps the detached
    embeddings it mined over in `mined` (they join the cross-batch memory if the step is used)."""

    def loss_fn(embeddings: torch.Tensor, labels: torch.Tensor):
        mined.append((embeddings.detach(), labels))
        return mining.mine(embeddings, labels, **mine_kwargs)

    return loss_fn


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


@dataclass
class _Phase:
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
    memory: EmbeddingMemory | None
    gather: Callable | None  # all-gather with gradients under torchrun
    no_sync: Callable | None  # DDP's no_sync under torchrun
    last_state: dict | None  # the stream's state after the last batch consumed
    bar: Any = None  # the progress display (tripletctl.progress)


@dataclass
class _Step:
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
class _Agreed:
    """The per-step decision every rank shares, from one all-reduce."""

    rows_seen: int
    rows_skipped: int
    classes_evicted: int
    stop_now: bool  # Ctrl-C/SIGTERM reached some rank
    collapsed: bool  # the collapse watchdog fired on some rank
    nonfinite: bool  # a NaN/inf loss or gradient on some rank
    signals: dict[str, float]  # what `until:` conditions read, averaged over the ranks


def run_phase(
    run: Run,
    phase_index: int,
    progress: RunProgress,
    stream_state: dict | None,
    memory: EmbeddingMemory | None = None,
) -> PhaseOutcome:
    """Run one phase from `progress.step` to its last step, or until it must stop (the outcome says
    why). `memory` is the cross-batch memory the previous phase (or the checkpoint) left."""
    ph = _open_phase(run, phase_index, progress, stream_state, memory)
    phase, train_cfg = ph.config, run.curriculum.train
    try:
        batches = iter(ph.stream)
        while not progress.phase_finished(phase):
            started = time.perf_counter()
            # 1. the next class-balanced batch (tokenised in worker processes, pinned memory). Between
            #    steps the state is consistent: a checkpoint now equals one at the end of the last step
            try:
                batch = next(batches)
            except (StreamInterrupted, WorkerDiedError) as error:
                return _stream_stopped(run, ph, progress, error)

            # 2. learning rate: a pure function of the step
            lr = get_lr(progress.step, phase, train_cfg.decay)
            for group in run.optimizer.param_groups:
                group["lr"] = lr

            # 3. embed in chunks, mine over the whole (global) batch, back-propagate chunk by chunk
            mode = progress.mining_override or phase.mining
            step = _embed_mine_backward(run, ph, progress, batch, mode)

            # 4. one collective per step decides for every rank (a NaN/inf must never reach the weights)
            agreed = _agree(run, ph, batch, step)
            ph.last_state = batch.state  # this batch is consumed whether or not it is used
            if agreed.nonfinite:
                skipped = _skip_nonfinite_step(run, ph, progress, step, agreed.stop_now)
                if skipped is not None:
                    return skipped
                continue

            # 5. the optimiser step; only embeddings of a usable step join the memory
            progress.nonfinite_streak = 0
            if ph.memory is not None:
                ph.memory.push(*step.mined[0])
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            fault_point("step")
            progress.step += 1
            progress.global_step += 1
            progress.samples_seen += phase.batch_size

            # 6. log: the phase's mining loss beside the batch-hard loss of the same batch, then the
            #    step's events (collapse, the `until:` end, the held-out eval)
            record = _step_record(run, ph, progress, step, agreed, mode, lr, time.perf_counter() - started)
            events: list[dict] = []
            collapse_stop = agreed.collapsed and _handle_collapse(run, ph, progress, step.stats, mode, events)
            done = _evaluate_and_check_end(run, ph, progress, agreed.signals, events)
            ph.log.append(record, *events)
            run.trackers.log(record, *events)

            # 7. checkpoint: every N steps, at the end of the phase, and whenever the phase stops here
            stopping = _stops_after_step(run, progress, collapse_stop, agreed.stop_now)
            final = done or stopping is not None
            until = _until_display(phase.until, ph.until_state)
            ph.bar.update(progress.step, record, phase.batch_size, final=final, until=until)
            if _should_checkpoint(progress.step, train_cfg.checkpoint_every, done, stopping):
                if not _checkpoint(run, ph, progress):
                    return _unsaved_nonfinite_weights(ph, progress)
            if stopping is not None:
                return PhaseOutcome(stopping, ph.last_state, memory=ph.memory)
    finally:
        ph.bar.stop()
        ph.stream.close()
        ph.log.close()
    return PhaseOutcome(PhaseEnd.DONE, ph.last_state, memory=ph.memory)


def _open_phase(
    run: Run, phase_index: int, progress: RunProgress, stream_state: dict | None, memory: EmbeddingMemory | None
) -> _Phase:
    """The phase's directory, metrics log, batch stream, chunking, watchdog, `until:` state, memory and
    progress display, as the checkpoint (or the previous phase) left them."""
    curriculum, ctx = run.curriculum, run.ctx
    phase, train_cfg = curriculum.phases[phase_index], curriculum.train
    directory = phase_dir_of(train_cfg.output_dir, phase_index, phase.name)
    if ctx.is_main:
        with writing(directory):
            directory.mkdir(parents=True, exist_ok=True)
    # batch_size is the global batch: the stream yields this rank's share of whole classes
    local_batch = local_batch_size(phase.batch_size, curriculum.data.rows_per_group, ctx)
    stream = BatchStream(
        curriculum.data,
        tokenizer_path=curriculum.model.tokenizer or curriculum.model.name,
        batch_size=phase.batch_size,
        seed=train_cfg.seed,
        state=stream_state,
        rank=ctx.rank,
        world_size=ctx.world_size,
        # a wait for data ends on Ctrl-C/SIGTERM; under torchrun the ranks decide together after the step
        should_stop=None if ctx.enabled else (lambda: run.stop.requested),
    )
    run.train_model.train()  # before the auto chunk probe: dropout masks take memory too
    autocast_dtype = _autocast_dtype(train_cfg.precision, ctx.device)
    chunking = resolve_chunking(
        phase.chunk_size,
        phase.chunk_tokens,
        local_batch,
        run.model,
        ctx.device,
        curriculum.data.max_length,
        autocast_dtype=autocast_dtype,
    )
    watchdog = CollapseWatchdog(train_cfg.collapse_patience, train_cfg.collapse_tolerance)
    if progress.watchdog:
        watchdog.load_state_dict(progress.watchdog)
    memory_size = phase.memory.size if phase.memory else None
    log = MetricsLog(directory)
    if ctx.is_main:  # on resume, what was logged after the checkpoint goes
        log.open(keep_up_to=progress.global_step)
    ph = _Phase(
        index=phase_index,
        config=phase,
        directory=directory,
        log=log,
        stream=stream,
        chunking=chunking,
        autocast_dtype=autocast_dtype,
        watchdog=watchdog,
        until_state=conditions.ConditionState.from_dict(progress.conditions),
        memory=carry_over(memory, memory_size, dim=run.model.embedding_dim, normalized=run.model.normalize),
        gather=partial(gather_with_grad, ctx=ctx) if ctx.enabled else None,
        no_sync=no_sync_for(run.train_model) if ctx.enabled else None,
        last_state=stream_state,
    )
    # a live bar on a terminal, plain lines every train.log_every steps in a file or pipe
    ph.bar = phase_progress(
        run.console,
        f"phase {phase_index} {phase.name}",
        phase.steps,
        progress.step,
        train_cfg.log_every,
        show=ctx.is_main,
        until=_until_display(phase.until, ph.until_state),
    )
    return ph


def _embed_mine_backward(run: Run, ph: _Phase, progress: RunProgress, batch: Any, mode: str) -> _Step:
    """Embed the batch in chunks, mine over the whole (global) batch (and the memory's rows, from its
    start_step on), back-propagate chunk by chunk, then clip or measure the gradient norm."""
    phase, train_cfg, device = ph.config, run.curriculum.train, run.ctx.device
    # rows travel unpadded: padded on the device, sorted by length and packed into chunks
    plan = plan_chunks(batch.lengths, ph.chunking)
    input_ids, attention_mask = pad_ragged(
        batch.token_ids.to(device, non_blocking=True), batch.lengths.to(device, non_blocking=True), batch.pad_id
    )
    labels = batch.labels.to(device, non_blocking=True)
    global_labels = gather_labels(labels, run.ctx) if run.ctx.enabled else labels
    generator = torch.Generator(device=device).manual_seed(train_cfg.seed * 1_000_003 + progress.global_step)
    use_memory = ph.memory is not None and ph.memory.filled > 0 and progress.step >= phase.memory.start_step
    memory_embeddings, memory_labels = ph.memory.contents() if use_memory else (None, None)
    mined: list[tuple[torch.Tensor, torch.Tensor]] = []
    loss_fn = _mining_loss(
        mined,
        mode=mode,
        margin=phase.margin,
        distance=phase.distance,
        fallback=phase.fallback,
        generator=generator,
        memory_embeddings=memory_embeddings,
        memory_labels=memory_labels,
    )
    loss_value, stats, _ = embed_and_backward(
        run.train_model,
        input_ids,
        attention_mask,
        global_labels,
        loss_fn,
        plan,
        autocast_dtype=ph.autocast_dtype,
        gather=ph.gather,
        no_sync=ph.no_sync,
    )
    if train_cfg.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), train_cfg.grad_clip))
    else:
        grads = [p.grad for p in run.model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    return _Step(float(loss_value), stats, plan, mined, grad_norm)


def _agree(run: Run, ph: _Phase, batch: Any, step: _Step) -> _Agreed:
    """One collective per step decides for every rank: stream counters, Ctrl-C/SIGTERM (it may reach
    the ranks at different moments), the collapse watchdog and a non-finite loss or gradient on any
    rank (each would otherwise step differently), and the signals `until:` conditions read (averaged,
    so every rank smooths the same numbers)."""
    stats, margin = step.stats, ph.config.margin
    rows_seen, rows_skipped, classes_evicted, signalled, collapsed, nonfinite, *signals = all_reduce_sums(
        [
            batch.rows_seen,
            batch.rows_skipped,
            batch.classes_evicted,
            run.stop.signal is not None,
            step.finite and ph.watchdog.update(stats.batch_hard_loss, margin, stats.embedding_spread),
            not step.finite,
            step.loss,
            stats.batch_hard_loss,
            stats.active_fraction,
        ],
        run.ctx,
    )
    return _Agreed(
        rows_seen=int(rows_seen),
        rows_skipped=int(rows_skipped),
        classes_evicted=int(classes_evicted),
        stop_now=signalled > 0,
        collapsed=collapsed > 0,
        nonfinite=nonfinite > 0,
        signals={name: value / run.ctx.world_size for name, value in zip(conditions.STEP_METRICS, signals)},
    )


def _stream_stopped(run: Run, ph: _Phase, progress: RunProgress, error: Exception) -> PhaseOutcome:
    """The stream gave no batch: Ctrl-C/SIGTERM while waiting for data, or a tokenizer worker died.
    Checkpoint what was consumed so far, so `--resume` continues from here."""
    if isinstance(error, StreamInterrupted):
        if progress.step > 0:  # at step 0 the last checkpoint (if any) already holds this state
            _checkpoint(run, ph, progress)
        return PhaseOutcome(PhaseEnd.INTERRUPTED, ph.last_state, memory=ph.memory)
    if run.ctx.enabled:  # the other ranks cannot join a checkpoint now: the last good one stays
        raise error
    _checkpoint(run, ph, progress)
    return PhaseOutcome(PhaseEnd.WORKER_DIED, ph.last_state, reason=str(error), memory=ph.memory)


def _skip_nonfinite_step(
    run: Run, ph: _Phase, progress: RunProgress, step: _Step, stop_now: bool
) -> PhaseOutcome | None:
    """A NaN/inf loss or gradient on some rank: drop the gradients and log a `nonfinite` event; then
    stop (on_nonfinite: stop, or train.max_nonfinite_skips in a row), or None: go on to the next batch."""
    phase, train_cfg = ph.config, run.curriculum.train
    run.optimizer.zero_grad(set_to_none=True)
    progress.nonfinite_streak += 1
    give_up = phase.on_nonfinite == "stop" or progress.nonfinite_streak >= train_cfg.max_nonfinite_skips
    if not give_up:
        progress.nonfinite_skipped += 1
    ph.log.append(
        {
            "event": "nonfinite",
            "global_step": progress.global_step + 1,
            "phase": phase.name,
            "step": progress.step + 1,
            "loss": step.loss,
            "grad_norm": step.grad_norm,
            "action": "stop" if give_up else "skip",
            "in_a_row": progress.nonfinite_streak,
        }
    )
    if give_up:
        why = (
            "on_nonfinite: stop"
            if phase.on_nonfinite == "stop"
            else f"{progress.nonfinite_streak} in a row, train.max_nonfinite_skips: {train_cfg.max_nonfinite_skips}"
        )
        reason = (
            f"non-finite loss or gradient at step {progress.step + 1} of phase {ph.index} ({phase.name}) "
            f"(loss {step.loss}, gradient norm {step.grad_norm}; {why}): stopped without a step"
        )
        return PhaseOutcome(PhaseEnd.NONFINITE, ph.last_state, reason=reason, memory=ph.memory)
    if stop_now:  # Ctrl-C during a skipped step: the weights are still the good ones
        _checkpoint(run, ph, progress)
        return PhaseOutcome(PhaseEnd.INTERRUPTED, ph.last_state, memory=ph.memory)
    return None


def _step_record(
    run: Run,
    ph: _Phase,
    progress: RunProgress,
    step: _Step,
    agreed: _Agreed,
    mode: str,
    lr: float,
    elapsed: float,
) -> dict:
    """The metrics.jsonl line of one optimiser step (docs/outputs.md)."""
    phase, stats, plan = ph.config, step.stats, step.plan
    record = {
        "phase": phase.name,
        "phase_index": ph.index,
        "step": progress.step,
        "global_step": progress.global_step,
        "mining": mode,
        "loss": step.loss,
        "batch_hard_loss": stats.batch_hard_loss,
        "active_fraction": stats.active_fraction,
        "mean_ap": stats.mean_ap,
        "mean_an": stats.mean_an,
        "embedding_spread": stats.embedding_spread,
        "skipped_anchors": stats.skipped_anchors,
        "num_triplets": stats.num_triplets,
        "lr": lr,
        "grad_norm": step.grad_norm if run.curriculum.train.grad_clip > 0 else None,
        "samples_per_s": phase.batch_size / elapsed if elapsed > 0 else None,
        "rows_seen": agreed.rows_seen,
        "rows_skipped": agreed.rows_skipped,
        "classes_evicted": agreed.classes_evicted,
        **ph.chunking.describe(),
        "chunks": len(plan.chunks),
        "graph_kept": plan.keep_graph,
        "padded_tokens": plan.padded_tokens,
        "real_tokens": plan.real_tokens,
        "time": time.time(),
    }
    if phase.memory is not None:  # `loss` above is then mined against the memory too
        record["memory_rows"] = stats.memory_rows
    return record


def _handle_collapse(run: Run, ph: _Phase, progress: RunProgress, stats: Any, mode: str, events: list[dict]) -> bool:
    """The watchdog saw the batch-hard loss stuck at the margin with no spread: add a `collapse` event,
    say so, and act on on_collapse (fall back to semi-hard mining, warn and watch again, or stop).
    True: the phase stops here (on_collapse: stop)."""
    phase = ph.config
    events.append(
        {
            "event": "collapse",
            "global_step": progress.global_step,
            "phase": phase.name,
            "action": phase.on_collapse,
            "batch_hard_loss": stats.batch_hard_loss,
            "embedding_spread": stats.embedding_spread,
            "margin": phase.margin,
        }
    )
    if run.ctx.is_main:
        ph.bar.print(
            f"[bold yellow]collapse suspected[/] at step {progress.step} of phase {phase.name}: "
            f"batch-hard loss {stats.batch_hard_loss:.4f} ~ margin {phase.margin}, "
            f"spread {stats.embedding_spread:.4f} (on_collapse: {phase.on_collapse})"
        )
    if phase.on_collapse == "fallback" and mode != "semi-hard":
        progress.mining_override = "semi-hard"
        ph.watchdog.reset()
    elif phase.on_collapse == "warn":
        ph.watchdog.reset()
    return phase.on_collapse == "stop"


def _evaluate_and_check_end(
    run: Run, ph: _Phase, progress: RunProgress, signals: dict[str, float], events: list[dict]
) -> bool:
    """After a step: the held-out eval when due, the `until:` conditions (on agreed numbers, so every
    rank ends at the same step), and how the phase ended, in `progress`. True: the phase is done."""
    phase, eval_cfg = ph.config, run.curriculum.eval
    planned_end = progress.step >= phase.steps
    evaluated = None
    if run.eval_rows is not None and (planned_end or (eval_cfg.every and progress.step % eval_cfg.every == 0)):
        evaluated = _eval_event(run, progress, phase)
    early_end = None
    if phase.until is not None:
        ph.until_state, held = conditions.advance(
            phase.until, ph.until_state, step=progress.step, metrics=signals, eval_metrics=evaluated
        )
        progress.conditions = ph.until_state.to_dict()
        if held and not planned_end:
            early_end = _until_event(phase.until, held, progress, phase)
            events.append(early_end)
            if run.ctx.is_main:
                ph.bar.print(f"phase {phase.name} ends at step {progress.step} of {phase.steps}: {early_end['reason']}")
            if run.eval_rows is not None and evaluated is None:  # the phase-end eval, as at a planned end
                evaluated = _eval_event(run, progress, phase)
    if evaluated is not None:
        events.append(evaluated)
        if run.on_eval is not None and run.ctx.is_main:
            run.on_eval(evaluated)
    if not planned_end and early_end is None:
        return False
    progress.phase_ends[str(ph.index)] = {
        "steps_planned": phase.steps,
        "steps_done": progress.step,
        "ended_by": "until" if early_end else "steps",
        "reason": early_end["reason"] if early_end else f"planned end (step {phase.steps})",
    }
    return True


def _stops_after_step(run: Run, progress: RunProgress, collapse_stop: bool, stop_now: bool) -> PhaseEnd | None:
    """Whether the phase stops after this step, and why (a collapse stop first, then Ctrl-C/SIGTERM,
    then the --max-steps budget); None: it goes on (or ends normally)."""
    if collapse_stop:
        return PhaseEnd.COLLAPSED
    if stop_now:
        return PhaseEnd.INTERRUPTED
    if run.stop_at_global_step is not None and progress.global_step >= run.stop_at_global_step:
        return PhaseEnd.PAUSED
    return None


def _should_checkpoint(step: int, every: int | None, phase_done: bool, stopping: PhaseEnd | None) -> bool:
    """Every `train.checkpoint_every` steps, at the end of the phase, and at any step the phase stops
    after (Ctrl-C/SIGTERM, --max-steps, a collapse stop), so `--resume` continues from there."""
    return phase_done or stopping is not None or bool(every and step % every == 0)


def _unsaved_nonfinite_weights(ph: _Phase, progress: RunProgress) -> PhaseOutcome:
    """A weight became NaN/inf: the phase stops and the last good checkpoint stays as it is."""
    reason = (
        f"non-finite weights after step {progress.step} of phase {ph.index} "
        f"({ph.config.name}): not saved over the last good checkpoint"
    )
    return PhaseOutcome(PhaseEnd.NONFINITE, ph.last_state, reason)


def _checkpoint(run: Run, ph: _Phase, progress: RunProgress) -> bool:
    """Save (every rank takes part); False, and nothing written, if a weight is NaN/inf."""
    model, ctx = run.model, run.ctx
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # equal on every rank
        return False
    progress.watchdog = ph.watchdog.state_dict()
    state_after, rng = ph.last_state, None
    if ctx.enabled:  # every rank reads its own shard and draws its own dropout: keep each one's
        state_after = {"per_rank": gather_object(state_after, ctx)}
        rng = gather_object(capture_rng(), ctx)
    if ctx.is_main:
        last_eval = progress.eval_history[-1] if progress.eval_history else None
        save_checkpoint(
            ph.directory / CHECKPOINT,
            model=model,
            tokenizer=run.tokenizer,
            optimizer=run.optimizer,
            state={**progress.__dict__, "phase_name": ph.config.name, "world_size": ctx.world_size},
            stream_state=state_after,
            curriculum=curriculum_to_dict(run.curriculum),
            rng=rng,
            memory=ph.memory.state_dict() if ph.memory is not None else None,
            metrics=last_eval if last_eval and last_eval.get("global_step") == progress.global_step else None,
        )
    barrier(ctx)
    return True


def _until_display(until: conditions.UntilConfig | None, state: conditions.ConditionState) -> str | None:
    return None if until is None else "  ".join(r.short() for r in conditions.readings(until, state))


def _until_event(
    until: conditions.UntilConfig, held: list[conditions.Reading], progress: RunProgress, phase: PhaseConfig
) -> dict:
    """The metrics.jsonl line saying which condition ended the phase, on which smoothed value."""
    first = held[0]
    return {
        "event": "until",
        "global_step": progress.global_step,
        "phase": phase.name,
        "step": progress.step,
        "steps_planned": phase.steps,
        "condition": first.condition,
        "metric": first.metric,
        "value": first.value,
        "threshold": first.threshold,
        "combine": until.combine,
        "window": until.window,
        "held": [
            {"condition": r.condition, "metric": r.metric, "value": r.value, "threshold": r.threshold, "count": r.count}
            for r in held
        ],
        "reason": "; ".join(r.describe(until.window) for r in held),
    }


def _eval_event(run: Run, progress: RunProgress, phase: PhaseConfig) -> dict:
    """The held-out eval after this step, as a metrics.jsonl event (kept in progress.eval_history)."""
    ctx = run.ctx
    metrics = _evaluate(run.model, run.tokenizer, run.eval_rows, run.curriculum, ctx.device) if ctx.is_main else {}
    metrics = broadcast_object(metrics, ctx)  # every rank holds the numbers (eval_plateau decides on them)
    event = {
        "event": "eval",
        "global_step": progress.global_step,
        "phase": phase.name,
        "phase_index": progress.phase_index,
        "step": progress.step,
        **metrics,
    }
    progress.eval_history.append(event)
    return event


def _phase_summary(
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


# What a half-done phase must keep on --resume: changing any of them would train one phase under two
# configurations (and report the new one for all of it). chunk_size, lr, steps... may change.
RESUME_PHASE_KEYS = ("batch_size", "mining", "margin", "distance")
RESUME_DATA_KEYS = ("samples_per_class",)


def check_resume_compatible(curriculum: Curriculum, saved: dict, state: dict, progress: RunProgress) -> None:
    """Refuse a resume that would split, lose or silently re-configure a phase that has started.

    `saved` is the curriculum the checkpoint was written under, `state` its state.json."""
    saved_phases = saved.get("phases") if isinstance(saved.get("phases"), list) else []
    index, restart = progress.phase_index, "or start a new run with train.output_dir=..."

    def saved_phase(i: int) -> dict:
        return saved_phases[i] if i < len(saved_phases) and isinstance(saved_phases[i], dict) else {}

    stopped_in = state.get("phase_name") or saved_phase(index).get("name") or f"phase {index}"
    stopped_in = stopped_in if isinstance(stopped_in, str) and len(stopped_in) <= 80 else f"phase {index}"
    for i in range(index + 1):  # every phase that has started keeps its place and its name
        old = stopped_in if i == index else saved_phase(i).get("name")
        if not isinstance(old, str) or len(old) > 80:
            continue
        if i >= len(curriculum.phases):
            raise ConfigError(
                [
                    f"--resume: the run stopped in phases[{index}] ({stopped_in}), but {curriculum.path} "
                    f"now has {len(curriculum.phases)} phases: phases[{i}] ({old}) was removed; "
                    f"put it back, {restart}"
                ]
            )
        if curriculum.phases[i].name != old:
            raise ConfigError(
                [
                    f"--resume: phases[{i}] was '{old}' when the run was checkpointed and is "
                    f"'{curriculum.phases[i].name}' in {curriculum.path}: renaming, removing or "
                    f"reordering a phase that has started would split it over two directories; "
                    f"restore it, {restart}"
                ]
            )
    phase = curriculum.phases[index]
    if not 0 < progress.step < phase.steps or progress.phase_finished(phase):
        return  # the next phase starts from scratch: any configuration is fine
    where = f"--resume: phases[{index}] ({phase.name}) is half done (step {progress.step} of {phase.steps})"
    problems = []
    changes = [(key, saved_phase(index).get(key), getattr(phase, key)) for key in RESUME_PHASE_KEYS]
    saved_data = saved.get("data") if isinstance(saved.get("data"), dict) else {}
    changes += [(f"data.{key}", saved_data.get(key), getattr(curriculum.data, key)) for key in RESUME_DATA_KEYS]
    for key, old, new in changes:
        if old is not None and old != new:
            old = repr(old) if len(repr(old)) <= 80 else repr(old)[:77] + "..."  # a file may hold anything
            problems.append(
                f"{where}: its {key} was {old} and is now {new!r}; resuming would mix two "
                f"configurations in one phase. Restore {key}, {restart}"
            )
    if problems:
        raise ConfigError(problems)


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
    try:
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
    previous = _check_before_start(curriculum, resume)
    check_source(curriculum.data)
    if ctx.is_main:  # a read-only or full output directory fails here, before the model is built
        _prepare_output(curriculum)
    if stop.requested:
        return _interrupted_during_start_up(console, curriculum, previous)
    # 2. the model and optimiser, then what the checkpoint holds
    model, tokenizer, optimizer = _build_model(curriculum, ctx)
    resumed = _load_resume(curriculum, previous, model, optimizer, ctx, console) if resume else _Resumed()
    train_model = wrap_model(model, ctx)
    if stop.requested:
        return _interrupted_during_start_up(console, curriculum, previous)
    # 3. held-out rows, trackers, run.json (with the untrained model's eval)
    eval_rows = None
    if curriculum.eval is not None:
        eval_rows = read_rows(curriculum.eval, limit=curriculum.eval.max_rows)
    trackers = Trackers()
    if ctx.is_main:  # before the first eval: a tracker that cannot start its run fails early
        trackers = open_trackers(
            train_cfg.report_to,
            Path(train_cfg.output_dir),
            curriculum_to_dict(curriculum),
            console=console,
            resume_step=resumed.progress.global_step if resume else None,
        )
    index = RunIndex(curriculum, ctx, resumed.progress, {i: "done" for i in range(resumed.progress.phase_index)})
    if ctx.is_main:
        _start_run_index(index, model, tokenizer, eval_rows, resumed.closed_phase, stop)
    if ctx.is_main and not resume and index.extra.get("eval_untrained"):  # step 0 of the first phase's eval
        trackers.log(
            {"event": "eval", "global_step": 0, "phase": curriculum.phases[0].name, **index.extra["eval_untrained"]}
        )
    barrier(ctx)
    if stop.requested:
        return _interrupted_during_start_up(console, curriculum, previous)
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
        on_eval=partial(_keep_best, index, model, tokenizer) if train_cfg.keep_best else None,
    )
    if resumed.rng is not None:
        restore_rng(resumed.rng)  # last, so nothing above consumes random numbers after the restore
    return _run_phases(run, index, resumed, command)


def _check_before_start(curriculum: Curriculum, resume: bool) -> Path | None:
    """The latest checkpoint, if any, once `--resume` (or its absence) fits the output directory and
    the checkpoint's own files (cheap, and every damaged one is one clear line) fit the curriculum."""
    output = Path(curriculum.train.output_dir)
    previous = latest_checkpoint(output)
    if previous is not None and not resume:
        raise TripletctlError(
            f"{output} already holds a run (latest checkpoint {previous}); "
            "pass --resume to continue it, or set train.output_dir=... to start a new one"
        )
    if resume and previous is None:
        raise TripletctlError(f"--resume: no checkpoint found under {output}")
    if resume:
        saved = load_checkpoint(previous)
        check_resume_compatible(
            curriculum, saved.curriculum, saved.state, RunProgress.from_state(saved.state, saved.path)
        )
    return previous


def _prepare_output(curriculum: Curriculum) -> None:
    """Create the output directory, remove what killed runs left, and save the curriculum as run."""
    output = Path(curriculum.train.output_dir)
    with writing(output):
        output.mkdir(parents=True, exist_ok=True)
        _clean_stale_files(output)
    replace_text(output / "curriculum.yaml", yaml.safe_dump(curriculum_to_dict(curriculum), sort_keys=False))


def _build_model(curriculum: Curriculum, ctx: DistContext) -> tuple[torch.nn.Module, Any, torch.optim.Optimizer]:
    """The seeded model on its device (compiled with train.compile), its tokenizer and the optimiser."""
    train_cfg = curriculum.train
    _seed_everything(train_cfg.seed + ctx.rank)  # ranks draw different dropout masks (weights are seeded apart)
    model, tokenizer = build_model(curriculum.model, seed=train_cfg.seed)
    positions = getattr(model.encoder.config, "max_position_embeddings", None)
    if positions and curriculum.data.max_length > positions:  # would crash in the first forward
        raise TripletctlError(
            f"{curriculum.path}: data.max_length must be at most the model's "
            f"max_position_embeddings ({positions}), got {curriculum.data.max_length}"
        )
    model.to(ctx.device)
    if train_cfg.compile:
        model.encoder = torch.compile(model.encoder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=curriculum.phases[0].lr, weight_decay=train_cfg.weight_decay)
    return model, tokenizer, optimizer


@dataclass
class _Resumed:
    """Where this invocation starts: from scratch, or what the checkpoint held, checked."""

    progress: RunProgress = field(default_factory=RunProgress)
    stream_state: dict | None = None
    memory: EmbeddingMemory | None = None
    rng: Any = None  # this rank's RNG state, restored last
    closed_phase: int | None = None  # the checkpoint ended this phase (its summary may be missing)


def _load_resume(
    curriculum: Curriculum,
    previous: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: DistContext,
    console: Console,
) -> _Resumed:
    """Load the weights and optimiser state into `model` and `optimizer`; the rest, checked, returned."""
    loaded = load_checkpoint(previous, model=model, optimizer=optimizer, map_location=ctx.device)
    world_size = loaded.state.get("world_size", 1)
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise CheckpointError(f"{loaded.path / 'state.json'} is damaged: world_size is {world_size!r}")
    check_world_size(world_size, ctx)
    resumed = _Resumed(RunProgress.from_state(loaded.state, loaded.path), loaded.stream_state, rng=loaded.rng)
    if loaded.memory is not None:
        try:
            resumed.memory = EmbeddingMemory.from_state_dict(loaded.memory, device=ctx.device)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {loaded.path} is damaged: memory.pt: {e}") from None
    if isinstance(resumed.rng, list):  # one state per rank (check_world_size made the counts equal)
        if len(resumed.rng) != ctx.world_size:
            raise CheckpointError(
                f"{loaded.path / 'rng.pt'} holds {len(resumed.rng)} ranks' states, the run has {ctx.world_size}"
            )
        resumed.rng = resumed.rng[ctx.rank]
    progress = resumed.progress
    if progress.phase_finished(curriculum.phases[progress.phase_index]):  # closed its phase: start the next one
        resumed.closed_phase = progress.phase_index
        progress.start_phase(progress.phase_index + 1)
    if ctx.is_main and progress.phase_index >= len(curriculum.phases):
        console.print(f"nothing to resume: every phase of {curriculum.path} is done ({previous})")
    elif ctx.is_main:
        console.print(
            f"resuming from {previous} at phase {progress.phase_index}, step {progress.step} "
            f"(global step {progress.global_step})"
        )
    return resumed


def _start_run_index(
    index: RunIndex, model: torch.nn.Module, tokenizer: Any, eval_rows: Any, closed_phase: int | None, stop: StopFlag
) -> None:
    """run.json at start-up (main process): what an earlier invocation recorded (start time, the
    untrained eval) kept, a closed phase's missing summary written, the untrained eval, the best model."""
    curriculum = index.curriculum
    output = Path(curriculum.train.output_dir)
    if index.path.exists():
        saved = json.loads(index.path.read_text())
        index.extra = {k: v for k, v in saved.items() if k in ("eval_untrained", "started")}
    else:
        index.extra = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if closed_phase is not None:  # killed between its last checkpoint and its summary
        summary_path = phase_dir_of(output, closed_phase, curriculum.phases[closed_phase].name) / "summary.json"
        if not summary_path.exists():
            write_json_atomic(summary_path, _phase_summary(curriculum, closed_phase, None, index.progress))
    if eval_rows is not None and "eval_untrained" not in index.extra and not stop.requested:
        index.extra["eval_untrained"] = _evaluate(model, tokenizer, eval_rows, curriculum, index.ctx.device)
    kept = best.read_best(output) if curriculum.train.keep_best else None
    if kept is not None:
        index.extra["best"] = kept
    index.write()


def _keep_best(index: RunIndex, model: torch.nn.Module, tokenizer: Any, event: dict) -> None:
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


def _run_phases(run: Run, index: RunIndex, resumed: _Resumed, command: list[str]) -> int:
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
                summary = _phase_summary(curriculum, phase_index, started, progress)
                write_json_atomic(
                    phase_dir_of(curriculum.train.output_dir, phase_index, phase.name) / "summary.json", summary
                )
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
        _print_outcome(run.console, curriculum, index.status, index.extra, exit_code, command, reason)
    return exit_code


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
        return Path(self.curriculum.train.output_dir) / "run.json"

    def all_done(self) -> bool:
        return all(s == "done" for s in self.status.values()) and len(self.status) == len(self.curriculum.phases)

    def write(self, with_progress: bool = True) -> None:
        if self.ctx.is_main:
            write_json_atomic(self.path, self.as_dict(self.progress if with_progress else None))

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


def _interrupted_during_start_up(console: Console, curriculum: Curriculum, previous: Path | None) -> int:
    if previous is not None:
        _print_line(
            console,
            "bold",
            "interrupted during start-up",
            f"nothing new to save, {previous} is unchanged; "
            f"continue with `tripletctl train {curriculum.path} --resume`",
        )
    else:
        _print_line(
            console,
            "bold",
            "interrupted during start-up",
            f"nothing was trained, nothing to save; start again with `tripletctl train {curriculum.path}`",
        )
    return EXIT_INTERRUPTED


def _print_line(console: Console, style: str, label: str, text: str) -> None:
    """A styled label and a message kept on one line (paths in it are never read as markup)."""
    console.print(f"[{style}]{label}[/]: ", end="")
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _print_outcome(
    console: Console,
    curriculum: Curriculum,
    status: dict[int, str],
    run_extra: dict,
    exit_code: int,
    command: list[str],
    reason: str | None = None,
) -> None:
    output = Path(curriculum.train.output_dir)
    resume_hint = f"continue with `{shlex.join(['tripletctl', 'train', *command, '--resume'])}`"
    latest = latest_checkpoint(output)
    where = "nothing to save yet" if latest is None else f"checkpoint {latest} ({_saved_step(latest)})"
    if exit_code == EXIT_INTERRUPTED:
        _print_line(
            console,
            "bold",
            "interrupted",
            f"{where}; " + (resume_hint if latest else f"start again with `tripletctl train {curriculum.path}`"),
        )
    elif exit_code == EXIT_WORKER_DIED:
        _print_line(console, "bold red", "stopped", f"{reason}; {where}; {resume_hint}")
    elif exit_code == EXIT_NONFINITE:
        _print_line(
            console,
            "bold red",
            "stopped",
            f"{reason}; the last good checkpoint is kept ({where}); "
            f"lower train.lr (or clip gradients), then {resume_hint}",
        )
    elif exit_code == EXIT_DONE and [status.get(i) for i in range(len(curriculum.phases))] != ["done"] * len(
        curriculum.phases
    ):
        _print_line(console, "bold", "paused by --max-steps", f"{where}; {resume_hint}")
    elif exit_code == EXIT_COLLAPSE_STOP:
        console.print(
            "[bold red]stopped: embeddings collapsed[/] (on_collapse: stop); checkpoint written. "
            f"Inspect with `tripletctl inspect-collapse {output}`"
        )
    untrained, final = run_extra.get("eval_untrained"), run_extra.get("eval_final")
    if untrained and final:
        source = curriculum.eval.source
        name = Path(source).name if isinstance(source, str) else "the eval files"
        title = Text(
            f"held-out retrieval ({untrained.get('rows', '?')} rows of {name})", no_wrap=True, overflow="ignore"
        )
        table = Table(title=title)  # the title is not wrapped at the (narrow) table's width
        table.add_column("metric")
        table.add_column("untrained", justify="right")
        table.add_column("trained", justify="right")
        for key in (
            "recall@1",
            "recall@5",
            "recall@10",
            "map@r",
            "r_precision",
            "triplet_accuracy",
            "given_negative_accuracy",
        ):
            if key in untrained and key in final:
                table.add_row(key, f"{untrained[key]:.4f}", f"{final[key]:.4f}")
        console.print(table)
    console.print(f"run directory: {output}  (phases: {', '.join(f'{i}:{s}' for i, s in sorted(status.items()))})")
    kept = run_extra.get("best")
    if kept:
        console.print(
            f"best model: {output / kept['model']} ({kept['metric']} {kept['value']:.4f} at phase "
            f"{kept['phase']}, step {kept['step']})",
            highlight=False,
        )
    if exit_code == EXIT_DONE and curriculum.eval is not None:
        console.print(
            f"next: tripletctl inspect-collapse {output} --plot collapse.png\n"
            f"      tripletctl plot {output}\n"
            f"      tripletctl export {output}{' --best' if kept else ''} ./my-model   # then: hf upload USER/my-model ./my-model",
            highlight=False,
            soft_wrap=True,
        )


def _saved_step(checkpoint: Path) -> str:
    try:
        state = json.loads((checkpoint / "state.json").read_text())
        return f"phase {state['phase_index']}, step {state['step']}"
    except (OSError, ValueError, KeyError):
        return "?"
