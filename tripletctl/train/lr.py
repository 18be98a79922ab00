"""The learning-rate schedule of a phase, as one pure function of the step (nanoGPT's get_lr)."""

from __future__ import annotations

import math

from tripletctl.config.blocks import PhaseConfig


def get_lr(step: int, phase: PhaseConfig, decay: str, peak: float | None = None) -> float:
    """Learning rate at `step` (0-based) of a phase: linear warm-up, then `decay` to 0 at the end.

    Pure, like nanoGPT's get_lr: resume needs no scheduler state, only the step counter. `peak`: the
    phase's rate after `train.lr_scaling` (config/lr_scaling.py `phase_peak_lr`); None: `phase.lr`.
    """
    lr = phase.lr if peak is None else peak
    if phase.warmup_steps > 0 and step < phase.warmup_steps:
        return lr * (step + 1) / phase.warmup_steps
    if decay == "none":
        return lr
    decay_steps = max(1, phase.steps - phase.warmup_steps)
    progress = min(1.0, (step - phase.warmup_steps) / decay_steps)
    if decay == "linear":
        return lr * (1.0 - progress)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine
