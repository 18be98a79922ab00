"""Divergence that is still finite: a run whose loss, gradient norm or weights jump by more than
`train.divergence_factor` times their running median. Caught like a NaN (exit 4), but earlier.

Why: at lr=1e6 the first step's loss and gradient are ordinary, its update multiplies the weights by
~1e7, and only the next forward turns NaN. Checked only for NaN, that step was applied and
checkpointed, so the "last good checkpoint" held exploded weights and every `--resume` with a lower
lr failed with exit 4 again. Here the loss and gradient norm are compared before the optimiser step
(a jumping step is never applied: `on_nonfinite` skips or stops it), and the weights' norm after the
step but before any checkpoint (the step is applied: the phase stops and the checkpoint on disk
stays the last one written from sane weights).

Pure bookkeeping on floats the loop already has, plus one norm over the parameters per step. Only
sane steps enter the history; the loss and gradient checks wait for WARMUP_STEPS of them (the first
steps of a phase move fast), the weights are compared from the first step (they never jump 100× in
one step of sane training). A loss is compared to at least the margin: a triplet loss near 0 says
nothing about the next one. The history starts again with each phase and each `--resume`.
"""

from __future__ import annotations

import statistics
from collections import deque

import torch

WINDOW = 50  # recent sane steps whose median is the yardstick
WARMUP_STEPS = 10  # sane steps seen before the loss and gradient norm are checked


def weight_norm(model: torch.nn.Module) -> float:
    """The L2 norm of all parameters together (one device sync)."""
    norms = torch._foreach_norm([p.detach() for p in model.parameters()])
    return float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))


class DivergenceDetector:
    """`factor` None: never fires (`train.divergence_factor: null`)."""

    def __init__(self, factor: float | None, loss_floor: float, weights: float | None = None) -> None:
        self.factor = factor
        self.loss_floor = loss_floor
        self.losses: deque[float] = deque(maxlen=WINDOW)
        self.grad_norms: deque[float] = deque(maxlen=WINDOW)
        self.weight_norms: deque[float] = deque([weights] if weights else [], maxlen=WINDOW)

    @property
    def enabled(self) -> bool:
        return self.factor is not None

    def step_jump(self, loss: float, grad_norm: float) -> str | None:
        """Before the optimiser step: why this step's loss or gradient norm diverges, or None."""
        if self.factor is None or len(self.losses) < WARMUP_STEPS:
            return None
        reference = max(statistics.median(self.losses), self.loss_floor)
        if loss > self.factor * reference:
            return self._why("loss", loss, reference)
        moving = [g for g in self.grad_norms if g > 0]  # steps with no active triplet have no gradient
        if moving and grad_norm > self.factor * statistics.median(moving):
            return self._why("gradient norm", grad_norm, statistics.median(moving))
        return None

    def weights_jump(self, norm: float) -> str | None:
        """After the optimiser step, before any checkpoint: why the weights diverge, or None."""
        if self.factor is None or not self.weight_norms:
            return None
        reference = statistics.median(self.weight_norms)
        return self._why("weight norm", norm, reference) if norm > self.factor * reference else None

    def observe(self, loss: float, grad_norm: float, weights: float | None) -> None:
        """A sane step that was applied joins the history."""
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        if weights is not None:
            self.weight_norms.append(weights)

    def _why(self, what: str, value: float, reference: float) -> str:
        return (
            f"{what} {value:.4g} is more than train.divergence_factor ({self.factor:g}) times "
            f"its recent median {reference:.4g}"
        )
