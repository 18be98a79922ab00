"""A learning rate that follows the batch (`train.lr_scaling`): a phase's peak rate is its `lr` times
(batch_size / reference) to the power 1/2 (`sqrt`) or 1 (`linear`).

Bigger batches average more gradients, so their noise is smaller and a larger step is safe: linear
scaling (Goyal et al. 2017) for SGD, square-root scaling (Krizhevsky 2014; Malladi et al. 2022 for
Adam) for adaptive optimisers. Pure and torch-free, so `validate`'s plan shows the same rate the
schedule (train/lr.py `get_lr`) uses.
"""

from __future__ import annotations

from tripletctl.config.blocks import Curriculum
from tripletctl.config.choices import LR_SCALINGS

EXPONENT = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}  # one per LR_SCALINGS name (tests/test_choices.py)


def scaled_lr(lr: float, batch_size: int, scaling: str, reference: int) -> float:
    """`lr` × (batch_size / reference) ** exponent; `none` returns `lr` itself (no rounding)."""
    if scaling not in EXPONENT:
        raise ValueError(f"unknown lr_scaling {scaling!r}; expected one of {', '.join(LR_SCALINGS)}")
    if scaling == "none":
        return lr
    if batch_size < 1 or reference < 1:
        raise ValueError(f"batch sizes must be positive, got batch_size {batch_size} and reference {reference}")
    return lr * (batch_size / reference) ** EXPONENT[scaling]


def reference_batch(c: Curriculum) -> int:
    """`train.lr_reference_batch`, or the first phase's batch size when it is left out."""
    return c.train.lr_reference_batch or c.phases[0].batch_size


def phase_peak_lr(c: Curriculum, index: int) -> float:
    """The peak learning rate phase `index` runs with (before warm-up and decay)."""
    phase = c.phases[index]
    return scaled_lr(phase.lr, phase.batch_size, c.train.lr_scaling, reference_batch(c))
