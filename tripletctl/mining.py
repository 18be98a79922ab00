"""Online triplet mining: pure tensor functions over one batch of embeddings.

Everything works on the B×B distance matrix and B×B per-row sorts, so memory is
O(B²) in every mode and for every class structure: no B×B×B tensor is ever
built, not even for batch-all (see ``docs/mining.md`` for the prefix-sum trick).

Anchor-positive pairs are all ordered pairs (a, p), a != p, with the same label;
negatives of a are all samples with another label.  The (a, p) pairs are kept
as a B×B mask instead of being extracted into a list, which keeps every step a
dense, vectorised op and needs no host synchronisation until the stats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("random", "semi-hard", "hard-negative", "batch-hard", "batch-all")
DISTANCES = ("euclidean", "squared-euclidean")
FALLBACKS = ("hardest", "easiest")

# Floor under the squared distance before the square root.  sqrt'(0) is
# infinite, so duplicate embeddings (d = 0) would give inf/nan gradients; with
# the floor their distance reads 1e-6 and the clamp passes a zero gradient.
SQRT_EPS = 1e-12

# Modes that mine one triplet per anchor-positive pair (the rest: per anchor / all).
_PAIR_MODES = ("random", "semi-hard", "hard-negative")


@dataclass(frozen=True)
class MiningStats:
    """What one mining step saw; plain floats so they can be logged without the graph."""

    loss: float  # the mined loss (same number as the returned tensor)
    batch_hard_loss: float  # batch-hard loss of the same batch, whatever the mode
    active_fraction: float  # fraction of the mode's triplets with loss > 0
    mean_ap: float  # mean d(a,p) over the mined triplets (0.0 when there are none)
    mean_an: float  # mean d(a,n) over the mined triplets (0.0 when there are none)
    num_triplets: int  # triplets the loss averages over (batch-all: all valid triplets)
    skipped_anchors: int  # anchors with no valid positive or no valid negative
    embedding_spread: float  # sqrt(mean ||e - mean(e)||^2): 0 when collapsed


def _working_dtype(embeddings: Tensor) -> Tensor:
    """bf16/fp16 embeddings are mined in float32: distances near the margin need the bits."""
    if embeddings.dtype in (torch.float16, torch.bfloat16) or not embeddings.is_floating_point():
        return embeddings.float()
    return embeddings


def pairwise_distances(embeddings: Tensor, distance: str = "euclidean") -> Tensor:
    """B×B distance matrix from the Gram matrix (one matmul, O(B²) memory).

    ``euclidean`` is ``sqrt(clamp(||x-y||², min=SQRT_EPS))``: finite gradients for
    duplicate embeddings (zero gradient there) at the cost of reading 1e-6 instead of 0.
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; expected one of {', '.join(DISTANCES)}")
    e = _working_dtype(embeddings)
    with torch.autocast(device_type=e.device.type, enabled=False):
        gram = e @ e.T
    sq_norm = torch.diagonal(gram)
    sq = (sq_norm[:, None] + sq_norm[None, :] - 2.0 * gram).clamp(min=0.0)
    if distance == "squared-euclidean":
        return sq
    return sq.clamp(min=SQRT_EPS).sqrt()


def _check(embeddings: Tensor, labels: Tensor, mode: str, fallback: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mining mode {mode!r}; expected one of {', '.join(MODES)}")
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; expected one of {', '.join(FALLBACKS)}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (B, D), got shape {tuple(embeddings.shape)}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be (B,) with B={embeddings.shape[0]}, got shape {tuple(labels.shape)}"
        )


@dataclass(frozen=True)
class _Masks:
    pos: Tensor  # B×B bool: (a, p) anchor-positive pairs of usable anchors
    neg: Tensor  # B×B bool: n is a negative of a
    n_neg: Tensor  # (B,) int64 negatives per anchor
    anchors: Tensor  # (B,) bool: has a positive and a negative


def _masks(labels: Tensor) -> _Masks:
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    neg = ~same
    n_neg = neg.sum(1)
    anchors = (same & ~eye).any(1) & (n_neg > 0)
    pos = same & ~eye & anchors[:, None]
    return _Masks(pos=pos, neg=neg, n_neg=n_neg, anchors=anchors)


def _sorted_negatives(dist: Tensor, m: _Masks, margin: float) -> tuple[Tensor, Tensor]:
    """Each row's negative distances ascending, non-negatives pushed to the end.

    The filler is a finite sentinel larger than any ``d(a,p) + margin`` so that
    searchsorted never counts it and no inf ever enters a differentiated op.
    """
    sentinel = dist.detach().max() + abs(float(margin)) + 1.0
    values, indices = dist.where(m.neg, sentinel).sort(dim=1)
    return values, indices


def _hardest_pairs(dist: Tensor, m: _Masks) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per anchor: farthest positive and closest negative (values and indices)."""
    d_ap, p_idx = dist.where(m.pos, -1.0).max(dim=1)
    far = dist.detach().max() + 1.0
    d_an, n_idx = dist.where(m.neg, far).min(dim=1)
    return d_ap, p_idx, d_an, n_idx


def _pair_negatives(
    dist: Tensor,
    m: _Masks,
    mode: str,
    margin: float,
    fallback: str,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """For every (a, p) cell: the chosen negative's distance and index (both B×B).

    Cells that are not anchor-positive pairs hold junk (finite) and are masked later.
    """
    b = dist.shape[0]
    last = (m.n_neg - 1).clamp(min=0)[:, None]
    if mode == "hard-negative":
        far = dist.detach().max() + 1.0
        d_an, n_idx = dist.where(m.neg, far).min(dim=1)
        return d_an[:, None].expand(b, b), n_idx[:, None].expand(b, b)
    if mode == "random":
        # k-th negative of row a = first column where the running count of negatives reaches k+1.
        u = torch.rand((b, b), generator=generator, device=dist.device)
        k = (u * m.n_neg[:, None]).long().clamp(max=last.expand(b, b))
        counts = m.neg.to(torch.int32).cumsum(dim=1)
        n_idx = torch.searchsorted(counts, (k + 1).to(torch.int32)).clamp(max=b - 1)
        return dist.gather(1, n_idx), n_idx
    # semi-hard: the closest negative strictly farther than the positive.
    values, indices = _sorted_negatives(dist, m, margin)
    pos = torch.searchsorted(values.detach(), dist.detach().contiguous(), right=True)
    outside = pos < m.n_neg[:, None]
    fb = torch.zeros_like(last) if fallback == "hardest" else last
    col = torch.where(outside, pos, fb.expand(b, b))
    return values.gather(1, col), indices.gather(1, col)


def _select(
    embeddings: Tensor,
    labels: Tensor,
    mode: str,
    margin: float,
    distance: str,
    fallback: str,
    generator: torch.Generator | None,
):
    _check(embeddings, labels, mode, fallback)
    dist = pairwise_distances(embeddings, distance)
    m = _masks(labels.to(dist.device))
    return dist, m


def mine(
    embeddings: Tensor,
    labels: Tensor,
    mode: str,
    margin: float,
    distance: str = "euclidean",
    fallback: str = "hardest",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, MiningStats]:
    """Mine triplets in one batch and return (differentiable scalar loss, stats).

    Loss per triplet is ``relu(d(a,p) - d(a,n) + margin)``, averaged over the
    mode's triplets (batch-all: over the active ones).  Anchors without a
    positive or a negative are skipped; with nothing valid the loss is a zero
    that is still connected to ``embeddings``.
    """
    dist, m = _select(embeddings, labels, mode, margin, distance, fallback, generator)
    zero = dist.new_zeros(())
    n_anchors = m.anchors.sum()

    # Batch-hard is the yardstick in every mode (compare phases on the hardest task);
    # outside batch-hard mode it is computed without graph.
    with torch.set_grad_enabled(mode == "batch-hard" and torch.is_grad_enabled()):
        bh_ap, _, bh_an, _ = _hardest_pairs(dist if mode == "batch-hard" else dist.detach(), m)
        bh_terms = torch.relu(bh_ap - bh_an + margin)

    if mode == "batch-hard":
        terms = bh_terms.where(m.anchors, zero)
        n_trip = n_anchors
        loss = terms.sum() / n_trip.clamp(min=1)
        with torch.no_grad():
            active = ((terms > 0) & m.anchors).sum()
            sum_ap = bh_ap.where(m.anchors, zero).sum()
            sum_an = bh_an.where(m.anchors, zero).sum()
    elif mode == "batch-all":
        values, _ = _sorted_negatives(dist, m, margin)
        query = dist + margin
        # Negatives with d(a,n) < d(a,p) + margin are exactly the active ones;
        # their summed loss is k*(d_ap + margin) - (sum of the k smallest d_an).
        k = torch.searchsorted(values.detach(), query.detach().contiguous(), right=False)
        prefix = torch.cat([values.new_zeros((values.shape[0], 1)), values.cumsum(dim=1)], dim=1)
        pair_sum = k.to(dist.dtype) * query - prefix.gather(1, k)
        pair_sum = pair_sum.where(m.pos, zero)
        k = k.where(m.pos, torch.zeros_like(k))
        active = k.sum()
        loss = pair_sum.sum() / active.clamp(min=1).to(dist.dtype)
        with torch.no_grad():
            n_neg_f = m.n_neg.to(dist.dtype)
            n_pos_f = m.pos.sum(1).to(dist.dtype)
            n_trip = (m.pos.sum(1) * m.n_neg).sum()
            sum_ap = (dist.where(m.pos, zero) * n_neg_f[:, None]).sum()
            sum_an = (dist.where(m.neg, zero).sum(1) * n_pos_f).sum()
    else:
        d_an, _ = _pair_negatives(dist, m, mode, margin, fallback, generator)
        terms = torch.relu(dist - d_an + margin).where(m.pos, zero)
        n_trip = m.pos.sum()
        loss = terms.sum() / n_trip.clamp(min=1).to(dist.dtype)
        with torch.no_grad():
            active = ((terms > 0) & m.pos).sum()
            sum_ap = dist.where(m.pos, zero).sum()
            sum_an = d_an.where(m.pos, zero).sum()

    with torch.no_grad():
        e = _working_dtype(embeddings.detach())
        spread = (e - e.mean(0)).pow(2).sum(1).mean().sqrt() if e.shape[0] else zero
        bh_loss = bh_terms.where(m.anchors, zero).sum() / n_anchors.clamp(min=1)
        denom = n_trip.clamp(min=1).to(dist.dtype)
        # One host transfer for all the numbers.
        nums = torch.stack(
            [
                loss.detach().to(dist.dtype),
                bh_loss.to(dist.dtype),
                active.to(dist.dtype) / denom,
                sum_ap / denom,
                sum_an / denom,
                n_trip.to(dist.dtype),
                (labels.shape[0] - n_anchors).to(dist.dtype),
                spread.to(dist.dtype),
            ]
        ).tolist()
    stats = MiningStats(
        loss=nums[0],
        batch_hard_loss=nums[1],
        active_fraction=nums[2],
        mean_ap=nums[3],
        mean_an=nums[4],
        num_triplets=int(round(nums[5])),
        skipped_anchors=int(round(nums[6])),
        embedding_spread=nums[7],
    )
    return loss, stats


def mine_indices(
    embeddings: Tensor,
    labels: Tensor,
    mode: str,
    margin: float = 0.2,
    distance: str = "euclidean",
    fallback: str = "hardest",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The mined triplets as (anchor, positive, negative) index vectors, for inspection and tests.

    Same selection as ``mine`` (same generator state → same triplets).  Not for
    ``batch-all``: it uses every active triplet, which is O(B³) to list.
    """
    if mode == "batch-all":
        raise ValueError("batch-all uses every active triplet; there is no O(B²) list to return")
    with torch.no_grad():
        dist, m = _select(embeddings, labels, mode, margin, distance, fallback, generator)
        if mode == "batch-hard":
            _, p_idx, _, n_idx = _hardest_pairs(dist, m)
            a = m.anchors.nonzero().squeeze(1)
            return a, p_idx[a], n_idx[a]
        _, n_idx = _pair_negatives(dist, m, mode, margin, fallback, generator)
        a, p = m.pos.nonzero(as_tuple=True)
        return a, p, n_idx[a, p]
