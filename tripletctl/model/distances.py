"""Distances between embeddings: the one implementation mining, the collapse report and the
cross-batch memory share (O(B·(B+M)) memory, never B×B×B)."""

from __future__ import annotations

import torch
from torch import Tensor

from tripletctl.config.choices import DISTANCES

# Floor under the squared distance before the square root.  sqrt'(0) is
# infinite, so duplicate embeddings (d = 0) would give inf/nan gradients; with
# the floor their distance reads 1e-6 and the clamp passes a zero gradient.
SQRT_EPS = 1e-12


def working_dtype(embeddings: Tensor) -> Tensor:
    """bf16/fp16 embeddings are mined in float32: distances near the margin need the bits."""
    if embeddings.dtype in (torch.float16, torch.bfloat16) or not embeddings.is_floating_point():
        return embeddings.float()
    return embeddings


def pairwise_distances(embeddings: Tensor, distance: str = "euclidean", memory: Tensor | None = None) -> Tensor:
    """B×B distance matrix from the Gram matrix (one matmul, O(B²) memory).

    ``euclidean`` is ``sqrt(clamp(||x-y||², min=SQRT_EPS))``: finite gradients for
    duplicate embeddings (zero gradient there) at the cost of reading 1e-6 instead of 0.
    With ``memory`` (M, D): B×(B+M), columns the batch then the memory rows, which
    are detached (no gradient may reach a stored embedding).
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; expected one of {', '.join(DISTANCES)}")
    e = working_dtype(embeddings)
    with torch.autocast(device_type=e.device.type, enabled=False):
        if memory is None:
            gram = e @ e.T
            sq_norm = sq_cols = torch.diagonal(gram)
        else:
            m = memory.detach().to(e.dtype)
            gram = e @ torch.cat([e, m]).T
            sq_norm = torch.diagonal(gram[:, : e.shape[0]])
            sq_cols = torch.cat([sq_norm, (m * m).sum(1)])
    sq = torch.add(sq_norm[:, None] + sq_cols[None, :], gram, alpha=-2.0)
    if distance == "squared-euclidean":
        return sq.clamp(min=0.0)  # rounding can dip below 0
    return sq.clamp(min=SQRT_EPS).sqrt()
