"""The live collapse watchdog: during training, the batch-hard loss stuck at the margin with no
embedding spread for `collapse_patience` steps means collapse (docs/collapse.md). Pure state, fed
the numbers every rank agrees on; its state round-trips through the checkpoint."""

from __future__ import annotations

import math
from typing import Any


class CollapseWatchdog:
    """Live collapse detector fed with each step's numbers (runner acts on it per `on_collapse`).

    A step looks collapsed when the batch-hard loss is within `tolerance * margin` of the margin
    AND the embedding spread is below `spread_threshold` (a loss at alpha alone can be a hard batch;
    with no spread it is the fixed point of collapse). `update` returns True on the step where
    `patience` such steps in a row are reached, and again every further `patience` steps while the
    streak lasts (so a run resumed after `on_collapse: stop` stops again if it is still collapsed).
    A healthy step or `reset` starts counting from 0. Keep the state in checkpoints so resume keeps
    counting.
    """

    def __init__(self, patience: int, tolerance: float, spread_threshold: float = 0.05):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.patience = int(patience)
        self.tolerance = float(tolerance)
        self.spread_threshold = float(spread_threshold)
        self.streak = 0  # consecutive collapsed-looking steps
        self.detections = 0  # times it fired (for logs)

    def looks_collapsed(self, batch_hard_loss: float, margin: float, embedding_spread: float) -> bool:
        """One step's test; NaN/inf never counts as collapse (that is a different failure)."""
        return (
            math.isfinite(batch_hard_loss)
            and math.isfinite(embedding_spread)
            and abs(batch_hard_loss - margin) <= self.tolerance * margin
            and embedding_spread < self.spread_threshold
        )

    def update(self, batch_hard_loss: float, margin: float, embedding_spread: float) -> bool:
        if self.looks_collapsed(batch_hard_loss, margin, embedding_spread):
            self.streak += 1
        else:
            self.streak = 0
        fired = self.streak > 0 and self.streak % self.patience == 0
        self.detections += fired
        return fired

    def reset(self) -> None:
        """Start counting afresh (e.g. after the runner falls back to semi-hard mining)."""
        self.streak = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "patience": self.patience,
            "tolerance": self.tolerance,
            "spread_threshold": self.spread_threshold,
            "streak": self.streak,
            "detections": self.detections,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters; thresholds stay as constructed (the curriculum may have changed them)."""
        self.streak = int(state.get("streak", 0))
        self.detections = int(state.get("detections", 0))
