"""Neighbour-class batches: which ready classes share a batch when a phase has `batch_classes: neighbours`.

The trainer keeps a running centroid of every class (train/class_centroids.py) and publishes a
snapshot of them every R = `data.neighbour_refresh` batches to a `CentroidBoard`. The batcher runs
ahead of the training step (prefetch, tokenizer workers), so it never reads the centroids "now":
batch i uses snapshot version `version_for_batch(i, R)`, which the trainer published at least R
batches before it trains batch i. Batches are therefore the same whatever the prefetch depth or the
machine's speed, and `--resume` is exact. Pure numpy: no torch here. Rules in docs/data.md.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

WAIT_SECONDS = 0.05  # how often a waiting batcher asks whether it must stop


def version_for_batch(index: int, refresh: int) -> int:
    """The centroid snapshot batch `index` (0-based, counted over the run's stream) uses: the one
    published after batch `(index // refresh - 1) * refresh`, i.e. at least `refresh` batches old."""
    return max(0, index // refresh - 1)


@dataclass(frozen=True)
class Snapshot:
    """Unit-length class centroids at one moment: row k of `vectors` is the class with id `ids[k]`."""

    ids: np.ndarray  # (n,) int64 class ids (data/stream.py's label_id)
    vectors: np.ndarray  # (n, dim) float32, each row of unit length
    row_of: dict[int, int] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.row_of:
            self.row_of.update({int(c): k for k, c in enumerate(self.ids.tolist())})

    @staticmethod
    def empty(dim: int = 1) -> Snapshot:
        return Snapshot(np.zeros(0, dtype=np.int64), np.zeros((0, dim), dtype=np.float32))


class Stopped(Exception):
    """`should_stop` said yes while waiting for a snapshot."""


class CentroidBoard:
    """Snapshots by version, shared by the trainer (publishes) and the batcher thread (reads).

    Holds only the versions a batch may still need (`keep_from`): memory is classes × dim per
    version, never classes²."""

    def __init__(self) -> None:
        self._snapshots: dict[int, Snapshot] = {}
        self._changed = threading.Condition()

    def publish(self, version: int, snapshot: Snapshot) -> None:
        with self._changed:
            self._snapshots[version] = snapshot
            self._changed.notify_all()

    def has(self, version: int) -> bool:
        with self._changed:
            return version in self._snapshots

    def get(self, version: int, should_stop: Callable[[], bool] = lambda: False) -> Snapshot:
        """The snapshot of `version`, waiting until it is published (`Stopped` when told to stop)."""
        with self._changed:
            while version not in self._snapshots:
                if should_stop():
                    raise Stopped
                self._changed.wait(WAIT_SECONDS)
            return self._snapshots[version]

    def keep_from(self, version: int) -> None:
        """Drop every snapshot older than `version`."""
        with self._changed:
            for old in [v for v in self._snapshots if v < version]:
                del self._snapshots[old]

    def versions(self) -> dict[int, Snapshot]:
        with self._changed:
            return dict(self._snapshots)


def choose_classes(ready: Sequence[int], snapshot: Snapshot, n_classes: int, share: float, group: int) -> list[int]:
    """Positions in `ready` (class ids, oldest first) of the `n_classes` classes of the next batch.

    The first `n_classes - round(share * n_classes)` are the oldest ready classes, as a random batch
    takes them. The rest come in groups of `group`: the oldest remaining class that has a centroid
    plus its nearest remaining classes by cosine similarity; once no remaining class has a centroid,
    the oldest remaining classes fill the slots. Cost per group: one (ready × dim) product."""
    n_classes = min(n_classes, len(ready))
    n_random = n_classes - int(round(share * n_classes))
    chosen = list(range(n_random))
    rows = np.array([snapshot.row_of.get(int(c), -1) for c in ready], dtype=np.int64)
    free = np.ones(len(ready), dtype=bool)
    free[:n_random] = False
    with_centroid = free & (rows >= 0)
    while len(chosen) < n_classes:
        seeds = np.flatnonzero(with_centroid)
        if not len(seeds):  # no centroid left: the oldest remaining classes, as a random batch
            chosen += np.flatnonzero(free)[: n_classes - len(chosen)].tolist()
            break
        seed = int(seeds[0])
        want = min(group, n_classes - len(chosen))
        candidates = seeds[1:]
        picked = [seed]
        if want > 1 and len(candidates):
            sims = snapshot.vectors[rows[candidates]] @ snapshot.vectors[rows[seed]]
            order = np.argsort(-sims, kind="stable")[: want - 1]  # ties: the older class first
            picked += candidates[order].tolist()
        chosen += picked
        free[picked] = with_centroid[picked] = False
    return chosen


@dataclass(frozen=True)
class NeighbourBatches:
    """What a batcher needs for `batch_classes: neighbours`: the board and the phase's keys."""

    board: CentroidBoard
    share: float
    group: int
    refresh: int
