"""Class centroids from training itself, for `batch_classes: neighbours` (docs/data.md).

Every consumed batch adds its detached, normalised embeddings (the global batch, after the
all-gather that mining already does, so every rank holds the same sums) to a running mean per class:
one one-hot matmul, no extra forward pass. Every R = `data.neighbour_refresh` batches a unit-length
snapshot goes to the `CentroidBoard` the batcher reads (data/neighbours.py says which version a batch
uses). The sums, the counts and the snapshots a batch may still need are tensors in the checkpoint
(`centroids.pt`), so `--resume` chooses the same classes. Memory: classes × dim, never classes².
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tripletctl.data.neighbours import CentroidBoard, Snapshot, version_for_batch


class ClassCentroids:
    """Running mean of each class's normalised embeddings (class ids as data/stream.py's label_id)."""

    def __init__(self, refresh: int, device: torch.device | str = "cpu"):
        self.refresh = int(refresh)
        self.device = torch.device(device)
        self.row_of: dict[int, int] = {}
        self.ids: list[int] = []  # class id of each row
        self.sums: torch.Tensor | None = None  # (capacity, dim) float32
        self.counts: torch.Tensor | None = None  # (capacity,) float32
        self.board = CentroidBoard()

    def add(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch: each row normalised, summed per class with a one-hot matmul."""
        x = F.normalize(embeddings.detach().float(), dim=1)
        classes, inverse = torch.unique(labels, return_inverse=True)
        one_hot = (inverse.unsqueeze(0) == torch.arange(len(classes), device=inverse.device).unsqueeze(1)).float()
        per_class, n = one_hot @ x, one_hot.sum(dim=1)
        rows = torch.tensor([self._row(int(c), x.shape[1]) for c in classes.tolist()], device=self.device)
        self.sums[rows] += per_class.to(self.device)
        self.counts[rows] += n.to(self.device)

    def _row(self, class_id: int, dim: int) -> int:
        row = self.row_of.get(class_id)
        if row is not None:
            return row
        if self.sums is None:
            self.sums = torch.zeros(64, dim, device=self.device)
            self.counts = torch.zeros(64, device=self.device)
        if len(self.ids) == len(self.sums):  # grow by doubling: amortised O(1) per new class
            self.sums = torch.cat([self.sums, torch.zeros_like(self.sums)])
            self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
        self.row_of[class_id] = row = len(self.ids)
        self.ids.append(class_id)
        return row

    def means(self) -> torch.Tensor:
        """(classes, dim): each class's mean embedding (not normalised), rows in `ids` order."""
        n = len(self.ids)
        return self.sums[:n] / self.counts[:n, None] if n else torch.zeros(0, 1)

    def snapshot(self) -> Snapshot:
        n = len(self.ids)
        if not n:
            return Snapshot.empty()
        vectors = F.normalize(self.sums[:n], dim=1).cpu().numpy().astype(np.float32)
        return Snapshot(np.array(self.ids, dtype=np.int64), vectors)

    def after_batch(
        self, index: int, embeddings: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> None:
        """Batch `index` of the stream is consumed (its embeddings None: a non-finite step adds nothing);
        after every R-th batch the snapshot of version (index + 1) / R is published."""
        if embeddings is not None and bool(torch.isfinite(embeddings).all()):
            self.add(embeddings, labels)
        if (index + 1) % self.refresh == 0:
            version = (index + 1) // self.refresh
            self.board.publish(version, self.snapshot())
            self.board.keep_from(version - 1)

    def start(self, index: int, new_phase: bool) -> None:
        """The stream's next batch is `index`: the versions a batch from there may need that the trainer
        will not publish any more. A phase that starts (nothing made ahead of it) uses the centroids as
        they are now; a resume inside a phase keeps the restored snapshots, as the straight run had them."""
        for version in range(version_for_batch(index, self.refresh), index // self.refresh + 1):
            if new_phase or not self.board.has(version):
                self.board.publish(version, self.snapshot())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (loaded with weights_only): the sums, counts and the snapshots still held."""
        n = len(self.ids)
        state = {
            "refresh": torch.tensor(self.refresh),
            "ids": torch.tensor(self.ids, dtype=torch.int64),
            "sums": self.sums[:n].cpu() if n else torch.zeros(0, 1),
            "counts": self.counts[:n].cpu() if n else torch.zeros(0),
        }
        for version, snap in self.board.versions().items():
            state[f"snapshot.{version}.ids"] = torch.from_numpy(snap.ids.copy())
            state[f"snapshot.{version}.vectors"] = torch.from_numpy(snap.vectors.copy())
        return state

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str = "cpu") -> ClassCentroids:
        """Raises ValueError on a state that does not fit together (a damaged centroids.pt)."""
        try:
            centroids = cls(int(state["refresh"]), device)
            if centroids.refresh < 1:
                raise ValueError(f"refresh is {centroids.refresh}")
            ids, sums, counts = state["ids"].tolist(), state["sums"], state["counts"]
            if len(ids) != len(sums) or len(ids) != len(counts) or len(set(ids)) != len(ids):
                raise ValueError("ids, sums and counts differ in length")
            if ids:
                centroids.ids, centroids.row_of = list(ids), {c: k for k, c in enumerate(ids)}
                centroids.sums, centroids.counts = sums.float().to(device), counts.float().to(device)
            for key in state:
                if key.startswith("snapshot.") and key.endswith(".ids"):
                    version = int(key.split(".")[1])
                    snap_ids = state[key].numpy().astype(np.int64)
                    vectors = state[f"snapshot.{version}.vectors"].numpy().astype(np.float32)
                    if len(snap_ids) != len(vectors):
                        raise ValueError(f"snapshot {version}: ids and vectors differ in length")
                    centroids.board.publish(version, Snapshot(snap_ids, vectors))
        except (KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"not a class-centroid state ({e})") from None
        return centroids


def for_run(
    phases: Sequence, refresh: int, device: torch.device, saved: ClassCentroids | None
) -> ClassCentroids | None:
    """The run's centroids: None unless some phase has `batch_classes: neighbours` (every phase then feeds
    them, so a later neighbour phase starts with centroids); the checkpoint's when it held them. A
    refresh changed between phases keeps the means and starts the snapshots again."""
    if not any(phase.batch_classes == "neighbours" for phase in phases):
        return None
    if saved is None:
        return ClassCentroids(refresh, device)
    if saved.refresh != refresh:
        saved.refresh, saved.board = refresh, CentroidBoard()
    return saved
