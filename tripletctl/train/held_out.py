"""Held-out evaluation during training: the untrained model's, every `eval.every` steps and at phase
ends, without disturbing the training RNG (a resumed run draws what an uninterrupted one would)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tripletctl.config.blocks import Curriculum, PhaseConfig
from tripletctl.config.until import EVAL_METRICS
from tripletctl.evaluation.retrieval import evaluate_model
from tripletctl.outputs.rng import capture_rng, restore_rng
from tripletctl.train.distributed import broadcast_object
from tripletctl.train.state import Run, RunProgress


def evaluate_held_out(
    model: torch.nn.Module, tokenizer: Any, rows: Any, curriculum: Curriculum, device: torch.device
) -> dict:
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


def eval_line(metrics: dict, when: str) -> str:
    """A held-out eval as one line of the log (on a terminal, above the bar), e.g.
    `held-out phase 0 semi-hard step 80/80: recall@1 0.9512 recall@5 ... (1,200 texts)`."""
    shown = " ".join(
        f"{key} {metrics[key]:.4f}"
        for key in (*EVAL_METRICS, "given_negative_accuracy")
        if isinstance(metrics.get(key), (int, float))
    )
    rows = metrics.get("rows")
    return f"held-out {when}: {shown}" + (f" ({rows:,} texts)" if isinstance(rows, int) else "")


def eval_event(run: Run, progress: RunProgress, phase: PhaseConfig, say: Callable[[str], None] | None = None) -> dict:
    """The held-out eval after this step, as a metrics.jsonl event (kept in progress.eval_history);
    `say` prints it as one line (the phase's progress display: plain log line, or above the bar)."""
    ctx = run.ctx
    metrics = (
        evaluate_held_out(run.model, run.tokenizer, run.eval_rows, run.curriculum, ctx.device) if ctx.is_main else {}
    )
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
    if say is not None and ctx.is_main:
        say(eval_line(metrics, f"phase {progress.phase_index} {phase.name} step {progress.step}/{phase.steps}"))
    return event
