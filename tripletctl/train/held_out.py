"""Held-out evaluation during training: the untrained model's, every `eval.every` steps and at phase
ends, without disturbing the training RNG (a resumed run draws what an uninterrupted one would)."""

from __future__ import annotations

from typing import Any

import torch

from tripletctl.config.blocks import Curriculum, PhaseConfig
from tripletctl.evaluation.retrieval import evaluate_model
from tripletctl.outputs.checkpoint import capture_rng, restore_rng
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


def eval_event(run: Run, progress: RunProgress, phase: PhaseConfig) -> dict:
    """The held-out eval after this step, as a metrics.jsonl event (kept in progress.eval_history)."""
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
    return event
