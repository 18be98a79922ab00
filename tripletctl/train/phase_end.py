"""How a phase ends: `PhaseEnd` (why `run_phase` returned), `PhaseOutcome` (what the next phase and
the closing report get), `EXIT_CODE_OF_END` (the one place an end becomes the exit code of `train`),
the outcome of each way a phase stops early, and the checkpoint it leaves behind, so that `--resume`
continues from there (a phase also saves one every `train.checkpoint_every` steps). A stop never
saves weights that are NaN/inf or that just jumped: the last good checkpoint stays."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from tripletctl.config.blocks import curriculum_to_dict
from tripletctl.core.exit_codes import EXIT_COLLAPSE_STOP, EXIT_DONE, EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_WORKER_DIED
from tripletctl.data.stream import StreamInterrupted
from tripletctl.outputs.checkpoint_find import CHECKPOINT
from tripletctl.outputs.checkpoint_save import save_checkpoint
from tripletctl.outputs.rng import capture_rng
from tripletctl.train.distributed import barrier, gather_object
from tripletctl.train.memory import EmbeddingMemory
from tripletctl.train.state import Agreed, OpenPhase, Run, RunProgress, StepResult


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
class PhaseOutcome:
    end: PhaseEnd
    stream_state: dict | None
    reason: str | None = None  # what stopped the phase, for the closing line
    memory: EmbeddingMemory | None = None  # the cross-batch memory, for the next phase


def stream_stopped(run: Run, ph: OpenPhase, progress: RunProgress, error: Exception) -> PhaseOutcome:
    """The stream gave no batch: Ctrl-C/SIGTERM while waiting for data, or a tokenizer worker died.
    Checkpoint what was consumed so far, so `--resume` continues from here."""
    if isinstance(error, StreamInterrupted):
        if progress.step > 0:  # at step 0 the last checkpoint (if any) already holds this state
            save_phase_checkpoint(run, ph, progress)
        return PhaseOutcome(PhaseEnd.INTERRUPTED, ph.last_state, memory=ph.memory)
    if run.ctx.enabled:  # the other ranks cannot join a checkpoint now: the last good one stays
        raise error
    save_phase_checkpoint(run, ph, progress)
    return PhaseOutcome(PhaseEnd.WORKER_DIED, ph.last_state, reason=str(error), memory=ph.memory)


def skip_nonfinite_step(
    run: Run, ph: OpenPhase, progress: RunProgress, result: StepResult, agreed: Agreed, jump: str | None
) -> PhaseOutcome | None:
    """A NaN/inf or diverging (`jump`, divergence.py) loss or gradient on some rank: drop the gradients
    and log a `nonfinite` or `divergence` event; then stop (on_nonfinite: stop, or
    train.max_nonfinite_skips in a row), or None: go on to the next batch."""
    phase, train_cfg = ph.config, run.curriculum.train
    run.optimizer.zero_grad(set_to_none=True)
    progress.nonfinite_streak += 1
    give_up = phase.on_nonfinite == "stop" or progress.nonfinite_streak >= train_cfg.max_nonfinite_skips
    if not give_up:
        progress.nonfinite_skipped += 1
    event = {"event": "nonfinite" if agreed.nonfinite else "divergence", "global_step": progress.global_step + 1}
    event |= {"phase": phase.name, "step": progress.step + 1, "loss": result.loss, "grad_norm": result.grad_norm}
    ph.log.append({**event, "action": "stop" if give_up else "skip", "in_a_row": progress.nonfinite_streak})
    if give_up:
        why = (
            "on_nonfinite: stop"
            if phase.on_nonfinite == "stop"
            else f"{progress.nonfinite_streak} in a row, train.max_nonfinite_skips: {train_cfg.max_nonfinite_skips}"
        )
        what = "non-finite" if agreed.nonfinite else "diverging"
        detail = f"; {jump}" if jump and not agreed.nonfinite else ""
        reason = (
            f"{what} loss or gradient at step {progress.step + 1} of phase {ph.index} ({phase.name}) "
            f"(loss {result.loss}, gradient norm {result.grad_norm}{detail}; {why}): stopped without a step"
        )
        return PhaseOutcome(PhaseEnd.NONFINITE, ph.last_state, reason=reason, memory=ph.memory)
    if agreed.stop_now:  # Ctrl-C during a skipped step: the weights are still the good ones
        save_phase_checkpoint(run, ph, progress)
        return PhaseOutcome(PhaseEnd.INTERRUPTED, ph.last_state, memory=ph.memory)
    return None


def stops_after_step(run: Run, progress: RunProgress, collapse_stop: bool, stop_now: bool) -> PhaseEnd | None:
    """Whether the phase stops after this step, and why (a collapse stop first, then Ctrl-C/SIGTERM,
    then the --max-steps budget); None: it goes on (or ends normally)."""
    if collapse_stop:
        return PhaseEnd.COLLAPSED
    if stop_now:
        return PhaseEnd.INTERRUPTED
    if run.stop_at_global_step is not None and progress.global_step >= run.stop_at_global_step:
        return PhaseEnd.PAUSED
    return None


def should_checkpoint(step: int, every: int | None, phase_done: bool, stopping: PhaseEnd | None) -> bool:
    """Every `train.checkpoint_every` steps, at the end of the phase, and at any step the phase stops
    after (Ctrl-C/SIGTERM, --max-steps, a collapse stop), so `--resume` continues from there."""
    return phase_done or stopping is not None or bool(every and step % every == 0)


def checkpoint_after_step(
    run: Run, ph: OpenPhase, progress: RunProgress, phase_done: bool, stopping: PhaseEnd | None
) -> PhaseOutcome | None:
    """After a step: the checkpoint when one is due, then the outcome if the phase stops here (or its
    weights turned NaN/inf: nothing saved); None: on to the next step (or the phase's normal end)."""
    if should_checkpoint(progress.step, run.curriculum.train.checkpoint_every, phase_done, stopping):
        if not save_phase_checkpoint(run, ph, progress):
            return unsaved_nonfinite_weights(ph, progress)
    if stopping is not None:
        return PhaseOutcome(stopping, ph.last_state, memory=ph.memory)
    return None


def exploded_weights(ph: OpenPhase, progress: RunProgress, why: str) -> PhaseOutcome:
    """The step just applied blew the weights up (finite, but training cannot go on from them): stop
    before any checkpoint holds them, so the last one on disk is a good one."""
    step = {"global_step": progress.global_step + 1, "phase": ph.config.name, "step": progress.step + 1}
    ph.log.append({"event": "divergence", **step, "action": "stop", "reason": why})
    reason = (
        f"diverging weights after step {progress.step + 1} of phase {ph.index} ({ph.config.name}) ({why}): not saved"
    )
    return PhaseOutcome(PhaseEnd.DIVERGED, ph.last_state, reason, memory=ph.memory)


def unsaved_nonfinite_weights(ph: OpenPhase, progress: RunProgress) -> PhaseOutcome:
    """A weight became NaN/inf: the phase stops and the last good checkpoint stays as it is."""
    reason = (
        f"non-finite weights after step {progress.step} of phase {ph.index} "
        f"({ph.config.name}): not saved over the last good checkpoint"
    )
    return PhaseOutcome(PhaseEnd.NONFINITE, ph.last_state, reason)


def save_phase_checkpoint(run: Run, ph: OpenPhase, progress: RunProgress) -> bool:
    """Save (every rank takes part); False, and nothing written, if a weight is NaN/inf."""
    model, ctx = run.model, run.ctx
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # equal on every rank
        return False
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
            state={
                **progress.__dict__,
                "watchdog": ph.watchdog.state_dict(),
                "phase_name": ph.config.name,
                "world_size": ctx.world_size,
            },
            stream_state=state_after,
            curriculum=curriculum_to_dict(run.curriculum),
            rng=rng,
            memory=ph.memory.state_dict() if ph.memory is not None else None,
            centroids=run.centroids.state_dict() if run.centroids is not None else None,
            mined=ph.mined.state_dict() if ph.mined is not None and not progress.phase_finished(ph.config) else None,
            metrics=last_eval if last_eval and last_eval.get("global_step") == progress.global_step else None,
        )
    barrier(ctx)
    return True
