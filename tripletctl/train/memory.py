"""Cross-batch memory: a FIFO queue of the last M embeddings (detached, float32) and their labels.

A slowly changing encoder drifts little over a few steps, so the embeddings of the last batches are
nearly what the encoder would give them now: kept in a queue, they give every anchor M extra
candidate positives and negatives (see `mining.mine`'s `memory_embeddings`) for the price of a
B×M distance block instead of M more rows of forward and backward (Wang et al., "Cross-Batch
Memory for Embedding Learning", CVPR 2020). `docs/mining.md` explains the staleness trade-off.

The queue is a ring buffer: a step writes its B rows over the oldest ones (O(B·D), no copy of the
queue). Its state is a dict of tensors, so checkpoints load it with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class EmbeddingMemory:
    """The newest `size` rows pushed so far; under torchrun every rank pushes the same gathered batch."""

    size: int
    normalized: bool  # the embeddings it holds are L2-normalised (a change of that clears the queue)
    embeddings: Tensor | None = None  # (size, D) float32 ring buffer, allocated by the first push
    labels: Tensor | None = None  # (size,) int64
    filled: int = 0  # rows holding data; while not full they are slots 0..filled-1
    head: int = 0  # the slot the next row goes to (the oldest row once full)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"memory size must be a positive integer, got {self.size}")

    @property
    def dim(self) -> int | None:
        return None if self.embeddings is None else int(self.embeddings.shape[1])

    def push(self, embeddings: Tensor, labels: Tensor) -> None:
        """Enqueue a batch (detached, float32), evicting the oldest rows once full."""
        e = embeddings.detach().float()
        y = labels.detach().to(device=e.device, dtype=torch.long)
        if self.embeddings is None or self.dim != e.shape[1] or self.embeddings.device != e.device:
            self.embeddings = e.new_zeros((self.size, e.shape[1]))
            self.labels = y.new_full((self.size,), -1)
            self.filled = self.head = 0
        e, y = e[-self.size :], y[-self.size :]  # a batch larger than the queue keeps its last rows
        slots = (self.head + torch.arange(e.shape[0], device=e.device)) % self.size
        self.embeddings[slots] = e
        self.labels[slots] = y
        self.head = (self.head + e.shape[0]) % self.size
        self.filled = min(self.size, self.filled + e.shape[0])

    def contents(self) -> tuple[Tensor, Tensor]:
        """(M, D) embeddings and (M,) labels to mine against, in slot order (views, not copies)."""
        if self.embeddings is None:
            raise ValueError("the memory is empty")
        return self.embeddings[: self.filled], self.labels[: self.filled]

    def chronological(self) -> tuple[Tensor, Tensor]:
        """The rows oldest first."""
        e, y = self.contents()
        if self.filled < self.size:
            return e, y
        return e.roll(-self.head, 0), y.roll(-self.head, 0)

    def resized(self, size: int) -> EmbeddingMemory:
        """A queue of another size holding the newest rows of this one."""
        out = EmbeddingMemory(size, self.normalized)
        if self.filled:
            out.push(*self.chronological())
        return out

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only: loadable with `torch.load(weights_only=True)`, nothing that executes."""
        empty = self.embeddings is None
        return {
            "size": torch.tensor(self.size),
            "normalized": torch.tensor(self.normalized),
            "filled": torch.tensor(self.filled),
            "head": torch.tensor(self.head),
            "embeddings": torch.zeros(0, 0) if empty else self.embeddings.cpu(),
            "labels": torch.zeros(0, dtype=torch.long) if empty else self.labels.cpu(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], device: torch.device | str = "cpu") -> EmbeddingMemory:
        """Inverse of `state_dict`; a ValueError says what does not fit (a damaged file)."""
        if not isinstance(state, dict):
            raise ValueError(f"not a memory state: a {type(state).__name__}, not a dict of tensors")
        try:
            size, filled, head = int(state["size"]), int(state["filled"]), int(state["head"])
            normalized = bool(state["normalized"])
            embeddings, labels = state["embeddings"], state["labels"]
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise ValueError(f"not a memory state: {e!r}") from None
        memory = cls(size, normalized) if size >= 1 else None
        if memory is None or not 0 <= filled <= size or not 0 <= head < size:
            raise ValueError(f"inconsistent memory state (size {size}, filled {filled}, head {head})")
        if not isinstance(embeddings, Tensor) or not isinstance(labels, Tensor):
            raise ValueError("memory state tensors are missing")
        if embeddings.numel() == 0:
            if filled:
                raise ValueError(f"memory state says {filled} rows but holds none")
            return memory
        if (
            embeddings.dim() != 2
            or embeddings.shape[0] != size
            or labels.shape != (size,)
            or not embeddings.is_floating_point()
            or labels.is_floating_point()
        ):
            raise ValueError(f"memory tensors {tuple(embeddings.shape)} / {tuple(labels.shape)} do not fit size {size}")
        if filled < size and head != filled:
            raise ValueError(f"inconsistent memory state (filled {filled} but next slot {head})")
        memory.embeddings = embeddings.to(device=device, dtype=torch.float32)
        memory.labels = labels.to(device=device, dtype=torch.long)
        memory.filled, memory.head = filled, head
        return memory


def carry_over(
    memory: EmbeddingMemory | None, size: int | None, *, dim: int, normalized: bool
) -> EmbeddingMemory | None:
    """The queue a phase starts with: none without `memory`; emptied when the embedding size or the
    normalisation changed (old rows would not be comparable); else the previous phase's rows,
    resized if the phase asks for another size."""
    if size is None:
        return None
    if memory is None or memory.normalized != normalized or memory.dim not in (None, dim):
        return EmbeddingMemory(size, normalized)
    return memory if memory.size == size else memory.resized(size)
