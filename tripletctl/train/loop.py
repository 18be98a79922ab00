"""The phase runner: one explicit loop per phase, embed -> mine -> loss -> step -> log -> checkpoint.

Read `run_phase` top to bottom to know exactly what a training step does. `train` only sets up
the model, optimiser and output directory, runs the phases in order and evaluates around them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch

from tripletctl.config.blocks import PhaseConfig
from tripletctl.config.choices import COLLAPSE_FALLBACK_MODE
from tripletctl.config.lr_scaling import phase_peak_lr
from tripletctl.config.mined_negatives import stream_rows
from tripletctl.config.until import STEP_METRICS
from tripletctl.core.errors import WorkerDiedError, writing
from tripletctl.core.faults import fault_point
from tripletctl.data.neighbours import NeighbourBatches
from tripletctl.data.stream import Batch, BatchStream, StreamInterrupted, pad_ragged
from tripletctl.model.chunking import Chunking, embed_and_backward, plan_chunks, resolve_chunking
from tripletctl.outputs.checkpoint_find import phase_dir as phase_dir_of
from tripletctl.outputs.metrics_log import MetricsLog
from tripletctl.train import conditions, held_out, mining
from tripletctl.train.distributed import all_reduce_sums, gather_labels, gather_with_grad, local_batch_size, no_sync_for
from tripletctl.train.divergence import DivergenceDetector, weight_norm
from tripletctl.train.lr import get_lr
from tripletctl.train.memory import EmbeddingMemory, carry_over
from tripletctl.train.mined_negatives import MinedTable, agreed_table
from tripletctl.train.phase_end import (
    PhaseEnd,
    PhaseOutcome,
    checkpoint_after_step,
    exploded_weights,
    skip_nonfinite_step,
    stops_after_step,
    stream_stopped,
)
from tripletctl.train.progress_bar import phase_progress
from tripletctl.train.state import Agreed, OpenPhase, Run, RunProgress, StepResult
from tripletctl.train.watchdog import CollapseWatchdog


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _mining_loss(mined: list, **mine_kwargs: Any) -> Callable:
    """The loss of the whole (global) batch for `embed_and_backward`; it also keeps the detached
    embeddings it mined over in `mined` (they join the cross-batch memory if the step is used)."""

    def loss_fn(embeddings: torch.Tensor, labels: torch.Tensor):
        mined.append((embeddings.detach(), labels))
        return mining.mine(embeddings, labels, **mine_kwargs)

    return loss_fn


def run_phase(
    run: Run, phase_index: int, progress: RunProgress, stream_state: dict | None, memory: EmbeddingMemory | None = None
) -> PhaseOutcome:
    """Run one phase from `progress.step` to its last step, or until it must stop (the outcome says
    why). `memory` is the cross-batch memory the previous phase (or the checkpoint) left."""
    ph = _open_phase(run, phase_index, progress, stream_state, memory)
    phase = ph.config
    try:
        batches = iter(ph.stream) if ph.mined is None else _with_mined_rows(run, ph.mined, iter(ph.stream))
        while not progress.phase_finished(phase):
            started = time.perf_counter()
            # 1. the next class-balanced batch (tokenised in worker processes, pinned memory). Between
            #    steps the state is consistent: a checkpoint now equals one at the end of the last step
            try:
                batch = next(batches)
            except (StreamInterrupted, WorkerDiedError) as error:
                return stream_stopped(run, ph, progress, error)
            run.stop.stepping = True  # a Ctrl-C from now on ends this step first

            # 2. learning rate: a pure function of the step (peak scaled to the batch: train.lr_scaling)
            lr = _set_lr(run, ph, progress)

            # 3. embed in chunks, mine over the whole (global) batch, back-propagate chunk by chunk
            mode = progress.mining_override or phase.mining
            result = _embed_mine_backward(run, ph, progress, batch, mode)

            # 4. this rank's collapse watchdog and divergence detector see the step, then one collective
            #    decides for every rank (a NaN/inf must never reach the weights)
            agreed, jump = _decide(run, ph, batch, result)
            ph.last_state = batch.state  # this batch is consumed whether or not it is used
            _feed_centroids(run, batch, result)
            if agreed.nonfinite or agreed.diverging:
                if (skipped := skip_nonfinite_step(run, ph, progress, result, agreed, jump)) is not None:
                    return skipped
                continue

            # 5. the optimiser step; only embeddings of a usable step join the memory
            progress.nonfinite_streak = 0
            if (exploded := _apply_step(run, ph, result)) is not None:
                return exploded_weights(ph, progress, exploded)  # before any checkpoint holds these weights
            fault_point("step")
            progress.count_step(phase.batch_size)

            # 6. log: the phase's mining loss beside the batch-hard loss of the same batch, then the
            #    step's events (collapse, the `until:` end, the held-out eval)
            record = _step_record(run, ph, progress, result, agreed, mode, lr, time.perf_counter() - started)
            events: list[dict] = []
            collapse_stop = agreed.collapsed and _handle_collapse(run, ph, progress, result.stats, mode, events)
            done = _evaluate_and_check_end(run, ph, progress, agreed.signals, events)
            ph.log.append(record, *events)
            run.trackers.log(record, *events)

            # 7. checkpoint: every N steps, at the end of the phase, and whenever the phase stops here
            stopping = stops_after_step(run, progress, collapse_stop, agreed.stop_now)
            _show_step(ph, progress, record, final=done or stopping is not None)
            if (ended := checkpoint_after_step(run, ph, progress, done, stopping)) is not None:
                return ended
    finally:
        ph.close()
    return PhaseOutcome(PhaseEnd.DONE, ph.last_state, memory=ph.memory)


def _feed_centroids(run: Run, batch: Any, result: StepResult) -> None:
    """The consumed batch's embeddings (global, detached; none from a non-finite step) join the class
    centroids, which publish a snapshot for the batcher every data.neighbour_refresh batches."""
    if run.centroids is not None:
        embeddings, labels = result.mined[0] if result.finite and result.mined else (None, None)
        run.centroids.after_batch(batch.index, embeddings, labels)


def _set_lr(run: Run, ph: OpenPhase, progress: RunProgress) -> float:
    """This step's learning rate, set on every parameter group."""
    peak = phase_peak_lr(run.curriculum, ph.index)
    lr = get_lr(progress.step, ph.config, run.curriculum.train.decay, peak=peak)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    return lr


def _decide(run: Run, ph: OpenPhase, batch: Any, result: StepResult) -> tuple[Agreed, str | None]:
    """This rank's collapse watchdog and divergence detector see a finite step, then `_agree`'s one
    collective decides for every rank. Also returns this rank's jump (divergence.py), for its event."""
    stats = result.stats
    suspected = result.finite and ph.watchdog.update(stats.batch_hard_loss, ph.config.margin, stats.embedding_spread)
    jump = ph.divergence.step_jump(result.loss, result.grad_norm) if result.finite else None
    return _agree(run, batch, result, collapse_suspected=suspected, diverging=jump is not None), jump


def _show_step(ph: OpenPhase, progress: RunProgress, record: dict, final: bool) -> None:
    """The live bar (or a plain line every train.log_every steps), with the `until:` conditions' state."""
    until = conditions.until_display(ph.config.until, ph.until_state)
    ph.bar.update(progress.step, record, ph.config.batch_size, final=final, until=until)


def _open_phase(
    run: Run, phase_index: int, progress: RunProgress, stream_state: dict | None, memory: EmbeddingMemory | None
) -> OpenPhase:
    """The phase's directory, metrics log, batch stream, chunking, watchdog, `until:` state, memory and
    progress display, as the checkpoint (or the previous phase) left them."""
    curriculum, ctx = run.curriculum, run.ctx
    phase, train_cfg = curriculum.phases[phase_index], curriculum.train
    directory = phase_dir_of(train_cfg.output_dir, phase_index, phase.name)
    if ctx.is_main:
        with writing(directory):
            directory.mkdir(parents=True, exist_ok=True)
    stream = _batch_stream(run, phase, stream_state)
    if run.centroids is not None:  # the snapshots the stream's next batches use
        run.centroids.start(stream.next_index, new_phase=progress.step == 0)
    chunking, autocast_dtype = _chunking(run, phase)
    watchdog = CollapseWatchdog(train_cfg.collapse_patience, train_cfg.collapse_tolerance)
    if progress.watchdog:
        watchdog.load_state_dict(progress.watchdog)
    memory_size = phase.memory.size if phase.memory else None
    log = MetricsLog(directory)
    if ctx.is_main:  # on resume, what was logged after the checkpoint goes
        log.open(keep_up_to=progress.global_step)
    mined = _mined_table(run, phase_index, progress, log)
    ph = OpenPhase(
        index=phase_index,
        config=phase,
        directory=directory,
        log=log,
        stream=stream,
        chunking=chunking,
        autocast_dtype=autocast_dtype,
        watchdog=watchdog,
        until_state=conditions.ConditionState.from_dict(progress.conditions),
        divergence=DivergenceDetector(
            train_cfg.divergence_factor,
            loss_floor=phase.margin,
            weights=weight_norm(run.model) if train_cfg.divergence_factor is not None else None,
        ),
        memory=carry_over(memory, memory_size, dim=run.model.embedding_dim, normalized=run.model.normalize),
        gather=partial(gather_with_grad, ctx=ctx) if ctx.enabled else None,
        no_sync=no_sync_for(run.train_model) if ctx.enabled else None,
        last_state=stream_state,
        mined=mined,
    )
    # a live bar on a terminal, plain lines every train.log_every steps in a file or pipe
    ph.bar = phase_progress(
        run.console,
        f"phase {phase_index} {phase.name}",
        phase.steps,
        progress.step,
        train_cfg.log_every,
        show=ctx.is_main,
        until=conditions.until_display(phase.until, ph.until_state),
    )
    return ph


def _batch_stream(run: Run, phase: PhaseConfig, stream_state: dict | None) -> BatchStream:
    """This rank's share of whole classes of each global batch, from where `stream_state` left off."""
    curriculum, ctx = run.curriculum, run.ctx
    neighbours = None
    if phase.batch_classes == "neighbours" and run.centroids is not None:
        neighbours = NeighbourBatches(
            run.centroids.board, phase.neighbour_share, phase.neighbour_group, curriculum.data.neighbour_refresh
        )
    return BatchStream(
        curriculum.data,
        tokenizer_path=curriculum.model.tokenizer or curriculum.model.name,
        batch_size=stream_rows(phase.batch_size, curriculum.data.samples_per_class, phase.mined_negatives),
        seed=curriculum.train.seed,
        state=stream_state,
        rank=ctx.rank,
        world_size=ctx.world_size,
        # a wait for data ends on Ctrl-C/SIGTERM; under torchrun the ranks decide together after the step
        should_stop=None if ctx.enabled else (lambda: run.stop.requested),
        neighbours=neighbours,
    )


def _mined_seed(run: Run) -> int:
    return run.curriculum.train.seed * 1009 + run.ctx.rank


def _with_mined_rows(run: Run, table: MinedTable, batches: Iterator[Batch]) -> Iterator[Batch]:
    """Each batch with its classes' mined rows after its own (mined_negatives): embedded fresh."""
    for batch in batches:
        yield table.extend(batch, run.curriculum.data.samples_per_class, _mined_seed(run))


def _mined_table(run: Run, phase_index: int, progress: RunProgress, log: MetricsLog) -> MinedTable | None:
    """mined_negatives: the checkpoint's table inside a phase, else one mined now (its cost logged)."""
    phase = run.curriculum.phases[phase_index]
    config = phase.mined_negatives
    if config is None:
        return None
    if progress.step > 0 and run.resumed_mined is not None:
        return run.resumed_mined
    console = run.console if run.ctx.is_main else None
    table, cost = agreed_table(
        run.model, run.tokenizer, run.curriculum.data, config, run.curriculum.train.seed, run.ctx, console, phase_index
    )
    if run.ctx.is_main:
        event = {"event": "mined_negatives", "global_step": progress.global_step, "phase": phase.name, **cost}
        log.append(event)
        run.trackers.log(event)
    return table


def _chunking(run: Run, phase: PhaseConfig) -> tuple[Chunking, torch.dtype | None]:
    """How this rank's share of a batch is cut into chunks (rows, or a token budget; `auto` probes the
    device), and the autocast dtype."""
    curriculum, ctx, train_cfg = run.curriculum, run.ctx, run.curriculum.train
    # batch_size is the global batch: the stream yields this rank's share of whole classes
    group = curriculum.data.rows_per_group + (phase.mined_negatives.per_class if phase.mined_negatives else 0)
    local_batch = local_batch_size(phase.batch_size, group, ctx)
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
        keep_graphs=train_cfg.keep_graphs,
    )
    return chunking, autocast_dtype


def _embed_mine_backward(run: Run, ph: OpenPhase, progress: RunProgress, batch: Any, mode: str) -> StepResult:
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
        loss=phase.loss,
        temperature=phase.temperature,
        hardness=phase.hardness_alpha,
        guard=phase.false_negative_guard,
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
    return StepResult(float(loss_value), stats, plan, mined, grad_norm)


def _apply_step(run: Run, ph: OpenPhase, result: StepResult) -> str | None:
    """The optimiser step; the embeddings of the step join the memory. Then why the weights diverged
    (divergence.py), or None: the step joins the detector's history."""
    if ph.memory is not None:
        ph.memory.push(*result.mined[0])
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    weights = weight_norm(run.model) if ph.divergence.enabled else None
    exploded = ph.divergence.weights_jump(weights) if weights is not None else None
    if exploded is None:
        ph.divergence.observe(result.loss, result.grad_norm, weights)
    return exploded


def _agree(run: Run, batch: Any, result: StepResult, collapse_suspected: bool, diverging: bool) -> Agreed:
    """One collective per step decides for every rank: stream counters, Ctrl-C/SIGTERM (it may reach
    the ranks at different moments), collapse suspected by some rank's watchdog and a non-finite loss
    or gradient on any rank (each would otherwise step differently), and the signals `until:`
    conditions read (averaged, so every rank smooths the same numbers). Pure: it changes nothing."""
    stats = result.stats
    rows_seen, rows_skipped, classes_evicted, signalled, collapsed, nonfinite, diverged, *signals = all_reduce_sums(
        [
            batch.rows_seen,
            batch.rows_skipped,
            batch.classes_evicted,
            run.stop.signal is not None,
            collapse_suspected,
            not result.finite,
            diverging,
            result.loss,
            stats.batch_hard_loss,
            stats.active_fraction,
        ],
        run.ctx,
    )
    return Agreed(
        rows_seen=int(rows_seen),
        rows_skipped=int(rows_skipped),
        classes_evicted=int(classes_evicted),
        stop_now=signalled > 0,
        collapsed=collapsed > 0,
        nonfinite=nonfinite > 0,
        diverging=diverged > 0,
        signals={name: value / run.ctx.world_size for name, value in zip(STEP_METRICS, signals)},
    )


def _step_record(
    run: Run,
    ph: OpenPhase,
    progress: RunProgress,
    result: StepResult,
    agreed: Agreed,
    mode: str,
    lr: float,
    elapsed: float,
) -> dict:
    """The metrics.jsonl line of one optimiser step (docs/outputs.md)."""
    phase, stats, plan = ph.config, result.stats, result.plan
    record = {
        "phase": phase.name,
        "phase_index": ph.index,
        "step": progress.step,
        "global_step": progress.global_step,
        "mining": mode,
        "loss": result.loss,
        "batch_hard_loss": stats.batch_hard_loss,
        "active_fraction": stats.active_fraction,
        "mean_ap": stats.mean_ap,
        "mean_an": stats.mean_an,
        "embedding_spread": stats.embedding_spread,
        "skipped_anchors": stats.skipped_anchors,
        "num_triplets": stats.num_triplets,
        "lr": lr,
        "grad_norm": result.grad_norm if run.curriculum.train.grad_clip > 0 else None,
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
    if phase.false_negative_guard is not None:
        record["guard_skipped"] = stats.guard_skipped
    return record


def _handle_collapse(run: Run, ph: OpenPhase, progress: RunProgress, stats: Any, mode: str, events: list[dict]) -> bool:
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
    if phase.on_collapse == "fallback" and mode != COLLAPSE_FALLBACK_MODE:
        progress.mining_override = COLLAPSE_FALLBACK_MODE
        ph.watchdog.reset()
    elif phase.on_collapse == "warn":
        ph.watchdog.reset()
    return phase.on_collapse == "stop"


def _evaluate_and_check_end(
    run: Run, ph: OpenPhase, progress: RunProgress, signals: dict[str, float], events: list[dict]
) -> bool:
    """After a step: the held-out eval when due, the `until:` conditions (on agreed numbers, so every
    rank ends at the same step), and how the phase ended, in `progress`. True: the phase is done."""
    phase, eval_cfg = ph.config, run.curriculum.eval
    planned_end = progress.step >= phase.steps
    evaluated = None
    if run.eval_rows is not None and (planned_end or (eval_cfg.every and progress.step % eval_cfg.every == 0)):
        evaluated = held_out.eval_event(run, progress, phase, ph.bar.print)
    early_end = None
    if phase.until is not None:
        ph.until_state, held = conditions.advance(
            phase.until, ph.until_state, step=progress.step, metrics=signals, eval_metrics=evaluated
        )
        progress.conditions = ph.until_state.to_dict()
        if held and not planned_end:
            early_end = conditions.until_event(
                phase.until, held, phase=phase, step=progress.step, global_step=progress.global_step
            )
            events.append(early_end)
            if run.ctx.is_main:
                ph.bar.print(f"phase {phase.name} ends at step {progress.step} of {phase.steps}: {early_end['reason']}")
            if run.eval_rows is not None and evaluated is None:  # the phase-end eval, as at a planned end
                evaluated = held_out.eval_event(run, progress, phase, ph.bar.print)
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
