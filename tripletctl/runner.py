"""The phase runner: one explicit loop per phase, embed -> mine -> loss -> step -> log -> checkpoint.

Read `run_phase` top to bottom to know exactly what a training step does. `train` only sets up
the model, optimiser and output directory, runs the phases in order and evaluates around them.
"""

from __future__ import annotations

import json
import math
import os
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
from tripletctl.chunking import embed_and_backward, plan_chunks, resolve_chunking
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
from tripletctl.memory import EmbeddingMemory, carry_over
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
PAUSED = -1  # internal: the step budget of this invocation is spent (exit 0, resume later)


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


@dataclass
class PhaseOutcome:
    exit_code: int
    stream_state: dict | None
    reason: str | None = None  # what stopped the phase, for the closing line
    memory: EmbeddingMemory | None = None  # the cross-batch memory, for the next phase


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _replace_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename: a crash leaves the old file or the new, never half;
    a refused write (disk full, read-only) is one OutputError line and leaves no temporary file."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with writing(path):
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _clean_stale_files(output: Path) -> None:
    """Start-up: remove what killed runs left behind (`*.tmp-PID` files, checkpoint tmp/trash
    directories, a superseded `checkpoint.prev`); none of it is ever read."""
    for directory in (output, *(d for d in output.glob("phase-*") if d.is_dir())):
        for stale in directory.glob("*.tmp-*"):
            if stale.is_file():
                stale.unlink(missing_ok=True)
        if directory != output:
            clean_leftovers(directory / CHECKPOINT)


def _finite_or_null(value: Any) -> Any:
    """Strict JSON has no NaN or Infinity: such numbers are written as null (docs/outputs.md)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def strict_json(payload: Any, indent: int | None = None) -> str:
    return json.dumps(_finite_or_null(payload), indent=indent, default=str, allow_nan=False)


def _write_json_atomic(path: Path, payload: dict) -> None:
    _replace_text(path, strict_json(payload, indent=2) + "\n")


def _truncate_metrics(path: Path, global_step: int) -> None:
    """On resume, drop records written after the checkpoint so the log has no duplicate steps."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the crash
        if record.get("global_step", 0) <= global_step:
            kept.append(line)
    _replace_text(path, "".join(k + "\n" for k in kept))  # a crash now must not lose the log


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


def run_phase(
    *,
    curriculum: Curriculum,
    phase_index: int,
    model: torch.nn.Module,
    train_model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    progress: RunProgress,
    stream_state: dict | None,
    ctx: DistContext,
    eval_rows: Any,
    stop: StopFlag,
    console: Console,
    stop_at_global_step: int | None,
    memory: EmbeddingMemory | None = None,
    trackers: Trackers | None = None,
    on_eval: Callable[[dict], None] | None = None,
) -> PhaseOutcome:
    """Run one phase from `progress.step` to its last step. `model` is the bare TripletEncoder,
    `train_model` the same model possibly wrapped in DDP (used for the forward passes). `memory`
    is the cross-batch memory the previous phase (or the checkpoint) left. `on_eval` sees each
    held-out eval event on the main process (it keeps the best model)."""
    phase = curriculum.phases[phase_index]
    train_cfg = curriculum.train
    device = ctx.device
    output = Path(train_cfg.output_dir)
    phase_dir = phase_dir_of(output, phase_index, phase.name)
    metrics_path = phase_dir / "metrics.jsonl"
    if ctx.is_main:
        with writing(phase_dir):
            phase_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, progress.global_step)

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
        should_stop=None if ctx.enabled else (lambda: stop.requested),
    )
    train_model.train()  # before the auto chunk probe: dropout masks take memory too
    autocast_dtype = _autocast_dtype(train_cfg.precision, device)
    chunking = resolve_chunking(
        phase.chunk_size,
        phase.chunk_tokens,
        local_batch,
        model,
        device,
        curriculum.data.max_length,
        autocast_dtype=autocast_dtype,
    )
    watchdog = CollapseWatchdog(train_cfg.collapse_patience, train_cfg.collapse_tolerance)
    if progress.watchdog:
        watchdog.load_state_dict(progress.watchdog)
    until = phase.until
    until_state = conditions.ConditionState.from_dict(progress.conditions)
    gather = partial(gather_with_grad, ctx=ctx) if ctx.enabled else None
    no_sync = no_sync_for(train_model) if ctx.enabled else None
    memory = carry_over(
        memory, phase.memory.size if phase.memory else None, dim=model.embedding_dim, normalized=model.normalize
    )

    def checkpoint(state_after: dict | None) -> bool:
        """Save (every rank takes part); False, and nothing written, if a weight is NaN/inf."""
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # equal on every rank
            return False
        progress.watchdog = watchdog.state_dict()
        rng = None
        if ctx.enabled:  # every rank reads its own shard and draws its own dropout: keep each one's
            state_after = {"per_rank": gather_object(state_after, ctx)}
            rng = gather_object(capture_rng(), ctx)
        if ctx.is_main:
            last_eval = progress.eval_history[-1] if progress.eval_history else None
            save_checkpoint(
                phase_dir / "checkpoint",
                model=model,
                tokenizer=tokenizer,
                optimizer=optimizer,
                state={**progress.__dict__, "phase_name": phase.name, "world_size": ctx.world_size},
                stream_state=state_after,
                curriculum=curriculum_to_dict(curriculum),
                rng=rng,
                memory=memory.state_dict() if memory is not None else None,
                metrics=last_eval if last_eval and last_eval.get("global_step") == progress.global_step else None,
            )
        barrier(ctx)
        return True

    with writing(metrics_path):
        metrics_file = metrics_path.open("a", encoding="utf-8") if ctx.is_main else None
    last_state = stream_state
    exit_code = EXIT_DONE
    # a live bar on a terminal, plain lines every train.log_every steps in a file or pipe
    bar = phase_progress(
        console,
        f"phase {phase_index} {phase.name}",
        phase.steps,
        progress.step,
        train_cfg.log_every,
        show=ctx.is_main,
        until=_until_display(until, until_state) if until is not None else None,
    )
    try:
        batches = iter(stream)
        while not progress.phase_finished(phase):
            started = time.perf_counter()
            # 1. the next class-balanced batch (tokenised in worker processes, pinned memory). Between
            #    steps the state is consistent: a checkpoint now equals one at the end of the last step
            try:
                batch = next(batches)
            except StreamInterrupted:  # Ctrl-C/SIGTERM while waiting for data
                if progress.step > 0:  # at step 0 the last checkpoint (if any) already holds this state
                    checkpoint(last_state)
                return PhaseOutcome(EXIT_INTERRUPTED, last_state, memory=memory)
            except WorkerDiedError as error:
                if ctx.enabled:  # the other ranks cannot join a checkpoint now: the last good one stays
                    raise
                checkpoint(last_state)
                return PhaseOutcome(EXIT_WORKER_DIED, last_state, reason=str(error), memory=memory)
            # rows travel unpadded: padded on the device, sorted by length and packed into chunks
            plan = plan_chunks(batch.lengths, chunking)
            input_ids, attention_mask = pad_ragged(
                batch.token_ids.to(device, non_blocking=True), batch.lengths.to(device, non_blocking=True), batch.pad_id
            )
            labels = batch.labels.to(device, non_blocking=True)
            global_labels = gather_labels(labels, ctx) if ctx.enabled else labels

            # 2. learning rate: a pure function of the step
            lr = get_lr(progress.step, phase, train_cfg.decay)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # 3. embed in chunks, mine over the whole (global) batch, back-propagate chunk by chunk
            mode = progress.mining_override or phase.mining
            generator = torch.Generator(device=device).manual_seed(train_cfg.seed * 1_000_003 + progress.global_step)
            #    (with a memory: against its rows too, from start_step on; then the global batch enters it)
            use_memory = memory is not None and memory.filled > 0 and progress.step >= phase.memory.start_step
            memory_embeddings, memory_labels = memory.contents() if use_memory else (None, None)
            mined_batch: list[tuple[torch.Tensor, torch.Tensor]] = []
            loss_fn = _mining_loss(
                mined_batch,
                mode=mode,
                margin=phase.margin,
                distance=phase.distance,
                fallback=phase.fallback,
                generator=generator,
                memory_embeddings=memory_embeddings,
                memory_labels=memory_labels,
            )

            loss_value, stats, _ = embed_and_backward(
                train_model,
                input_ids,
                attention_mask,
                global_labels,
                loss_fn,
                plan,
                autocast_dtype=autocast_dtype,
                gather=gather,
                no_sync=no_sync,
            )
            # 4. is this step usable? A NaN/inf loss or gradient must never reach the weights
            if train_cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip))
            else:
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            step_finite = math.isfinite(float(loss_value)) and math.isfinite(grad_norm)

            # 5. one collective per step decides for every rank: stream counters, Ctrl-C/SIGTERM
            #    (it may reach the ranks at different moments), the collapse watchdog and a
            #    non-finite loss or gradient on any rank (each would otherwise step differently)
            #    and the signals `until:` conditions read (averaged, so every rank smooths the same numbers)
            rows_seen, rows_skipped, classes_evicted, signalled, collapsed, nonfinite, *signals = all_reduce_sums(
                [
                    batch.rows_seen,
                    batch.rows_skipped,
                    batch.classes_evicted,
                    stop.signal is not None,
                    step_finite and watchdog.update(stats.batch_hard_loss, phase.margin, stats.embedding_spread),
                    not step_finite,
                    float(loss_value),
                    stats.batch_hard_loss,
                    stats.active_fraction,
                ],
                ctx,
            )
            stop_now = signalled > 0
            agreed = {name: value / ctx.world_size for name, value in zip(conditions.STEP_METRICS, signals)}
            last_state = batch.state  # this batch is consumed whether or not it is used
            if nonfinite > 0:
                optimizer.zero_grad(set_to_none=True)
                progress.nonfinite_streak += 1
                give_up = phase.on_nonfinite == "stop" or progress.nonfinite_streak >= train_cfg.max_nonfinite_skips
                if not give_up:
                    progress.nonfinite_skipped += 1
                event = {
                    "event": "nonfinite",
                    "global_step": progress.global_step + 1,
                    "phase": phase.name,
                    "step": progress.step + 1,
                    "loss": float(loss_value),
                    "grad_norm": grad_norm,
                    "action": "stop" if give_up else "skip",
                    "in_a_row": progress.nonfinite_streak,
                }
                if metrics_file is not None:
                    metrics_file.write(strict_json(event) + "\n")
                    metrics_file.flush()
                if give_up:
                    why = (
                        "on_nonfinite: stop"
                        if phase.on_nonfinite == "stop"
                        else f"{progress.nonfinite_streak} in a row, train.max_nonfinite_skips: "
                        f"{train_cfg.max_nonfinite_skips}"
                    )
                    nonfinite_message = (
                        f"non-finite loss or gradient at step {progress.step + 1} of phase "
                        f"{phase_index} ({phase.name}) (loss {float(loss_value)}, gradient "
                        f"norm {grad_norm}; {why}): stopped without a step"
                    )
                    return PhaseOutcome(EXIT_NONFINITE, last_state, reason=nonfinite_message, memory=memory)
                if stop_now:  # Ctrl-C during a skipped step: the weights are still the good ones
                    checkpoint(last_state)
                    return PhaseOutcome(EXIT_INTERRUPTED, last_state, memory=memory)
                continue
            progress.nonfinite_streak = 0
            if memory is not None:  # only embeddings of a usable step join the memory
                memory.push(*mined_batch[0])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            fault_point("step")
            progress.step += 1
            progress.global_step += 1
            progress.samples_seen += phase.batch_size

            # 6. log: the phase's mining loss beside the batch-hard loss of the same batch
            elapsed = time.perf_counter() - started
            record = {
                "phase": phase.name,
                "phase_index": phase_index,
                "step": progress.step,
                "global_step": progress.global_step,
                "mining": mode,
                "loss": float(loss_value),
                "batch_hard_loss": stats.batch_hard_loss,
                "active_fraction": stats.active_fraction,
                "mean_ap": stats.mean_ap,
                "mean_an": stats.mean_an,
                "embedding_spread": stats.embedding_spread,
                "skipped_anchors": stats.skipped_anchors,
                "num_triplets": stats.num_triplets,
                "lr": lr,
                "grad_norm": grad_norm if train_cfg.grad_clip > 0 else None,
                "samples_per_s": phase.batch_size / elapsed if elapsed > 0 else None,
                "rows_seen": int(rows_seen),
                "rows_skipped": int(rows_skipped),
                "classes_evicted": int(classes_evicted),
                **chunking.describe(),
                "chunks": len(plan.chunks),
                "graph_kept": plan.keep_graph,
                "padded_tokens": plan.padded_tokens,
                "real_tokens": plan.real_tokens,
                "time": time.time(),
            }
            if phase.memory is not None:  # `loss` above is then mined against the memory too
                record["memory_rows"] = stats.memory_rows
            events = []
            # collapse watchdog: batch-hard loss stuck at the margin and no spread
            if collapsed > 0:
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
                if ctx.is_main:
                    bar.print(
                        f"[bold yellow]collapse suspected[/] at step {progress.step} of phase {phase.name}: "
                        f"batch-hard loss {stats.batch_hard_loss:.4f} ~ margin {phase.margin}, "
                        f"spread {stats.embedding_spread:.4f} (on_collapse: {phase.on_collapse})"
                    )
                if phase.on_collapse == "fallback" and mode != "semi-hard":
                    progress.mining_override = "semi-hard"
                    watchdog.reset()
                elif phase.on_collapse == "stop":
                    exit_code = EXIT_COLLAPSE_STOP
                elif phase.on_collapse == "warn":
                    watchdog.reset()
            planned_end = progress.step >= phase.steps
            evaluated = None
            if eval_rows is not None and (
                planned_end or (curriculum.eval.every and progress.step % curriculum.eval.every == 0)
            ):
                evaluated = _eval_event(model, tokenizer, eval_rows, curriculum, progress, phase, ctx)
            early_end = None  # `until:` conditions, on agreed numbers: every rank ends at the same step
            if until is not None:
                until_state, held = conditions.advance(
                    until, until_state, step=progress.step, metrics=agreed, eval_metrics=evaluated
                )
                progress.conditions = until_state.to_dict()
                if held and not planned_end:
                    early_end = _until_event(until, held, progress, phase)
                    events.append(early_end)
                    if ctx.is_main:
                        bar.print(
                            f"phase {phase.name} ends at step {progress.step} of {phase.steps}: {early_end['reason']}"
                        )
                    if eval_rows is not None and evaluated is None:  # the phase-end eval, as at a planned end
                        evaluated = _eval_event(model, tokenizer, eval_rows, curriculum, progress, phase, ctx)
            if evaluated is not None:
                events.append(evaluated)
                if on_eval is not None and ctx.is_main:
                    on_eval(evaluated)
            done = planned_end or early_end is not None
            if done:
                progress.phase_ends[str(phase_index)] = {
                    "steps_planned": phase.steps,
                    "steps_done": progress.step,
                    "ended_by": "until" if early_end else "steps",
                    "reason": early_end["reason"] if early_end else f"planned end (step {phase.steps})",
                }
            if metrics_file is not None:
                with writing(metrics_path):
                    metrics_file.write("".join(strict_json(r) + "\n" for r in (record, *events)))
                    metrics_file.flush()
            if trackers is not None:
                trackers.log(record, *events)

            # 7. checkpoint: every N steps, at the end of the phase, on Ctrl-C/SIGTERM, on a collapse stop
            paused = stop_at_global_step is not None and progress.global_step >= stop_at_global_step
            bar.update(
                progress.step,
                record,
                phase.batch_size,
                final=done or paused or stop_now or exit_code == EXIT_COLLAPSE_STOP,
                until=_until_display(until, until_state) if until is not None else None,
            )
            every = train_cfg.checkpoint_every
            if done or paused or stop_now or exit_code == EXIT_COLLAPSE_STOP or (every and progress.step % every == 0):
                if not checkpoint(last_state):
                    return PhaseOutcome(
                        EXIT_NONFINITE,
                        last_state,
                        f"non-finite weights after step {progress.step} of phase {phase_index} "
                        f"({phase.name}): not saved over the last good checkpoint",
                    )
            if exit_code == EXIT_COLLAPSE_STOP:
                return PhaseOutcome(EXIT_COLLAPSE_STOP, last_state, memory=memory)
            if stop_now:
                return PhaseOutcome(EXIT_INTERRUPTED, last_state, memory=memory)
            if paused:
                return PhaseOutcome(PAUSED, last_state, memory=memory)
    finally:
        bar.stop()
        stream.close()
        if metrics_file is not None:
            try:
                metrics_file.close()
            except OSError:  # a full disk already reported by the write above
                pass
    return PhaseOutcome(EXIT_DONE, last_state, memory=memory)


def _until_display(until: conditions.UntilConfig | None, state: conditions.ConditionState) -> str:
    return "" if until is None else "  ".join(r.short() for r in conditions.readings(until, state))


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


def _eval_event(model, tokenizer, rows, curriculum, progress, phase, ctx) -> dict:
    metrics = _evaluate(model, tokenizer, rows, curriculum, ctx.device) if ctx.is_main else {}
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
    metrics_path = phase_dir / "metrics.jsonl"
    if metrics_path.exists():
        for line in metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash or a full disk
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


def _run_index(
    curriculum: Curriculum, ctx: DistContext, status: dict[int, str], extra: dict, progress: RunProgress | None = None
) -> dict:
    output = Path(curriculum.train.output_dir)

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
        "curriculum": str(curriculum.path),
        "output_dir": str(output),
        "world_size": ctx.world_size,
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
                "status": status.get(i, "pending"),
            }
            for i, p in enumerate(curriculum.phases)
        ],
        **extra,
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
    output = Path(train_cfg.output_dir)
    device = ctx.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Fail on bad input before any work starts.
    previous = latest_checkpoint(output)
    if previous is not None and not resume:
        raise TripletctlError(
            f"{output} already holds a run (latest checkpoint {previous}); "
            "pass --resume to continue it, or set train.output_dir=... to start a new one"
        )
    if resume and previous is None:
        raise TripletctlError(f"--resume: no checkpoint found under {output}")
    if resume:  # the checkpoint's own files first (cheap, and every damaged one is one clear line)
        saved = load_checkpoint(previous)
        check_resume_compatible(
            curriculum, saved.curriculum, saved.state, RunProgress.from_state(saved.state, saved.path)
        )
    check_source(curriculum.data)
    if ctx.is_main:  # a read-only or full output directory fails here, before the model is built
        with writing(output):
            output.mkdir(parents=True, exist_ok=True)
            _clean_stale_files(output)
        _replace_text(output / "curriculum.yaml", yaml.safe_dump(curriculum_to_dict(curriculum), sort_keys=False))
    if stop.requested:
        return _interrupted_during_start_up(console, curriculum, previous)

    _seed_everything(train_cfg.seed + ctx.rank)  # ranks draw different dropout masks (weights are seeded apart)
    model, tokenizer = build_model(curriculum.model, seed=train_cfg.seed)
    positions = getattr(model.encoder.config, "max_position_embeddings", None)
    if positions and curriculum.data.max_length > positions:  # would crash in the first forward
        raise TripletctlError(
            f"{curriculum.path}: data.max_length must be at most the model's "
            f"max_position_embeddings ({positions}), got {curriculum.data.max_length}"
        )
    model.to(device)
    if train_cfg.compile:
        model.encoder = torch.compile(model.encoder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=curriculum.phases[0].lr, weight_decay=train_cfg.weight_decay)
    progress = RunProgress()
    stream_state: dict | None = None
    memory: EmbeddingMemory | None = None
    rng_state = None
    closed_phase: int | None = None
    if resume:
        loaded = load_checkpoint(previous, model=model, optimizer=optimizer, map_location=device)
        world_size = loaded.state.get("world_size", 1)
        if isinstance(world_size, bool) or not isinstance(world_size, int):
            raise CheckpointError(f"{loaded.path / 'state.json'} is damaged: world_size is {world_size!r}")
        check_world_size(world_size, ctx)
        progress = RunProgress.from_state(loaded.state, loaded.path)
        stream_state = loaded.stream_state
        if loaded.memory is not None:
            try:
                memory = EmbeddingMemory.from_state_dict(loaded.memory, device=device)
            except ValueError as e:
                raise CheckpointError(f"checkpoint {loaded.path} is damaged: memory.pt: {e}") from None
        rng_state = loaded.rng
        if isinstance(rng_state, list):  # one state per rank (check_world_size made the counts equal)
            if len(rng_state) != ctx.world_size:
                raise CheckpointError(
                    f"{loaded.path / 'rng.pt'} holds {len(rng_state)} ranks' states, the run has {ctx.world_size}"
                )
            rng_state = rng_state[ctx.rank]
        phase = curriculum.phases[progress.phase_index]
        if progress.phase_finished(phase):  # the checkpoint closed its phase: start the next one
            closed_phase = progress.phase_index
            progress.start_phase(progress.phase_index + 1)
        if ctx.is_main and progress.phase_index >= len(curriculum.phases):
            console.print(f"nothing to resume: every phase of {curriculum.path} is done ({previous})")
        elif ctx.is_main:
            console.print(
                f"resuming from {previous} at phase {progress.phase_index}, step {progress.step} "
                f"(global step {progress.global_step})"
            )
    train_model = wrap_model(model, ctx)
    if stop.requested:
        return _interrupted_during_start_up(console, curriculum, previous)

    eval_rows = None
    if curriculum.eval is not None:
        eval_rows = read_rows(curriculum.eval, limit=curriculum.eval.max_rows)

    trackers = Trackers()
    if ctx.is_main:  # before the first eval: a tracker that cannot start its run fails early
        trackers = open_trackers(
            train_cfg.report_to,
            output,
            curriculum_to_dict(curriculum),
            console=console,
            resume_step=progress.global_step if resume else None,
        )
    status: dict[int, str] = {i: "done" for i in range(progress.phase_index)}
    run_extra: dict = {}
    run_json = output / "run.json"
    if ctx.is_main:
        if run_json.exists():
            run_extra = {
                k: v for k, v in json.loads(run_json.read_text()).items() if k in ("eval_untrained", "started")
            }
        else:
            run_extra = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if closed_phase is not None:  # killed between its last checkpoint and its summary
            summary_path = phase_dir_of(output, closed_phase, curriculum.phases[closed_phase].name) / "summary.json"
            if not summary_path.exists():
                _write_json_atomic(summary_path, _phase_summary(curriculum, closed_phase, None, progress))
        if eval_rows is not None and "eval_untrained" not in run_extra and not stop.requested:
            run_extra["eval_untrained"] = _evaluate(model, tokenizer, eval_rows, curriculum, device)
        kept = best.read_best(output) if train_cfg.keep_best else None
        if kept is not None:
            run_extra["best"] = kept
        _write_json_atomic(run_json, _run_index(curriculum, ctx, status, run_extra, progress))
    if ctx.is_main and not resume and run_extra.get("eval_untrained"):  # step 0 of the first phase's eval
        trackers.log(
            {"event": "eval", "global_step": 0, "phase": curriculum.phases[0].name, **run_extra["eval_untrained"]}
        )
    barrier(ctx)
    if stop.requested:
        return _interrupted_during_start_up(console, curriculum, previous)

    def keep_best(event: dict) -> None:
        """A new held-out best replaces OUTPUT/best at once, and run.json names it."""
        record = best.offer(
            output,
            train_cfg.keep_best,
            event,
            model=model,
            tokenizer=tokenizer,
            curriculum=curriculum_to_dict(curriculum),
        )
        if record is not None:
            event["new_best"] = True
            run_extra["best"] = record
            _write_json_atomic(run_json, _run_index(curriculum, ctx, status, run_extra, progress))

    if rng_state is not None:
        restore_rng(rng_state)  # last, so nothing above consumes random numbers after the restore

    exit_code = EXIT_DONE
    reason = None
    stop_at = progress.global_step + max_steps if max_steps is not None else None
    try:
        for index in range(progress.phase_index, len(curriculum.phases)):
            started = time.time()
            status[index] = "running"
            if ctx.is_main:
                _write_json_atomic(run_json, _run_index(curriculum, ctx, status, run_extra, progress))
            outcome = run_phase(
                curriculum=curriculum,
                phase_index=index,
                model=model,
                train_model=train_model,
                tokenizer=tokenizer,
                optimizer=optimizer,
                progress=progress,
                stream_state=stream_state,
                ctx=ctx,
                eval_rows=eval_rows,
                stop=stop,
                console=console,
                stop_at_global_step=stop_at,
                memory=memory,
                trackers=trackers,
                on_eval=keep_best if train_cfg.keep_best else None,
            )
            stream_state = outcome.stream_state  # the next phase continues the stream, never restarts it
            memory = outcome.memory
            phase_done = progress.phase_finished(curriculum.phases[index])
            if ctx.is_main:
                summary = _phase_summary(curriculum, index, started, progress)
                _write_json_atomic(phase_dir_of(output, index, curriculum.phases[index].name) / "summary.json", summary)
            status[index] = (
                "done"
                if phase_done and outcome.exit_code in (EXIT_DONE, PAUSED)
                else {
                    EXIT_COLLAPSE_STOP: "stopped (collapse)",
                    EXIT_INTERRUPTED: "interrupted",
                    EXIT_WORKER_DIED: "stopped (worker died)",
                    EXIT_NONFINITE: "stopped (non-finite)",
                }.get(outcome.exit_code, "paused")
            )
            if outcome.exit_code != EXIT_DONE:
                exit_code = outcome.exit_code if outcome.exit_code > 0 else EXIT_DONE
                reason = outcome.reason
                break
            if index + 1 < len(curriculum.phases):
                progress.start_phase(index + 1)
        if ctx.is_main:
            if (
                all(s == "done" for s in status.values())
                and len(status) == len(curriculum.phases)
                and eval_rows is not None
            ):
                run_extra["eval_final"] = progress.eval_history[-1] if progress.eval_history else None
            _write_json_atomic(run_json, _run_index(curriculum, ctx, status, run_extra, progress))
    except BaseException as error:  # run.json must not say "running" for a run that is gone
        trackers.close(EXIT_INTERRUPTED if isinstance(error, KeyboardInterrupt) else EXIT_CRASH)
        if ctx.is_main:
            _record_failure(run_json, curriculum, ctx, status, run_extra, error)
        raise
    if ctx.is_main:
        trackers.close(exit_code)
        _print_outcome(console, curriculum, status, run_extra, exit_code, command, reason)
    return exit_code


def _record_failure(
    run_json: Path,
    curriculum: Curriculum,
    ctx: DistContext,
    status: dict[int, str],
    run_extra: dict,
    error: BaseException,
) -> None:
    """Best effort (the disk may be the problem): the running phase becomes `interrupted` or
    `failed`, and run.json says why."""
    interrupted = isinstance(error, KeyboardInterrupt)
    for index, value in status.items():
        if value == "running":
            status[index] = "interrupted" if interrupted else "failed"
    if not interrupted:
        run_extra["error"] = str(error) if isinstance(error, TripletctlError) else f"{type(error).__name__}: {error}"
    try:
        _write_json_atomic(run_json, _run_index(curriculum, ctx, status, run_extra))
    except Exception:
        pass


def _interrupted_during_start_up(console: Console, curriculum: Curriculum, previous: Path | None) -> int:
    if previous is not None:
        _one_line(
            console,
            "bold",
            "interrupted during start-up",
            f"nothing new to save, {previous} is unchanged; "
            f"continue with `tripletctl train {curriculum.path} --resume`",
        )
    else:
        _one_line(
            console,
            "bold",
            "interrupted during start-up",
            f"nothing was trained, nothing to save; start again with `tripletctl train {curriculum.path}`",
        )
    return EXIT_INTERRUPTED


def _one_line(console: Console, style: str, label: str, text: str) -> None:
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
        _one_line(
            console,
            "bold",
            "interrupted",
            f"{where}; " + (resume_hint if latest else f"start again with `tripletctl train {curriculum.path}`"),
        )
    elif exit_code == EXIT_WORKER_DIED:
        _one_line(console, "bold red", "stopped", f"{reason}; {where}; {resume_hint}")
    elif exit_code == EXIT_NONFINITE:
        _one_line(
            console,
            "bold red",
            "stopped",
            f"{reason}; the last good checkpoint is kept ({where}); "
            f"lower train.lr (or clip gradients), then {resume_hint}",
        )
    elif exit_code == EXIT_DONE and [status.get(i) for i in range(len(curriculum.phases))] != ["done"] * len(
        curriculum.phases
    ):
        _one_line(console, "bold", "paused by --max-steps", f"{where}; {resume_hint}")
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
