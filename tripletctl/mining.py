"""Online triplet mining: pure tensor functions over one batch of embeddings.

Everything works on the B×B distance matrix, one B×B per-row sort and a (B, P)
layout of the anchor-positive pairs (P = largest class - 1), so memory is O(B²)
in every mode and for every class structure: no B×B×B tensor is ever built, not
even for batch-all (see ``docs/mining.md`` for the prefix-sum trick).

Anchor-positive pairs are all ordered pairs (a, p), a != p, with the same label;
negatives of a are all samples with another label.

With a cross-batch memory (``memory_embeddings``/``memory_labels``: M detached
rows of earlier batches) the anchors stay the B batch rows but the candidates
are batch ∪ memory: the matrices become B×(B+M), still never three-way, and no
gradient reaches the memory rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# The names are the curriculum's choices; declared there so that loading one never imports torch.
from tripletctl.curriculum import DISTANCES, FALLBACKS
from tripletctl.curriculum import MINING_MODES as MODES

# Floor under the squared distance before the square root.  sqrt'(0) is
# infinite, so duplicate embeddings (d = 0) would give inf/nan gradients; with
# the floor their distance reads 1e-6 and the clamp passes a zero gradient.
SQRT_EPS = 1e-12


@dataclass(frozen=True)
class MiningStats:
    """What one mining step saw; plain floats so they can be logged without the graph."""

    loss: float  # the mined loss (same number as the returned tensor)
    batch_hard_loss: float  # in-batch batch-hard loss of the same batch, whatever the mode or memory
    active_fraction: float  # fraction of the mode's triplets with loss > 0
    mean_ap: float  # mean d(a,p) over the mined triplets (0.0 when there are none)
    mean_an: float  # mean d(a,n) over the mined triplets (0.0 when there are none)
    num_triplets: int  # triplets the loss averages over (batch-all: all valid triplets)
    skipped_anchors: int  # anchors with no valid positive or no valid negative
    embedding_spread: float  # sqrt(mean ||e - mean(e)||^2): 0 when collapsed
    memory_rows: int = 0  # memory rows among the candidates (0: in-batch mining)


def _working_dtype(embeddings: Tensor) -> Tensor:
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
    e = _working_dtype(embeddings)
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


def _check(
    embeddings: Tensor,
    labels: Tensor,
    mode: str,
    fallback: str,
    memory_embeddings: Tensor | None = None,
    memory_labels: Tensor | None = None,
) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mining mode {mode!r}; expected one of {', '.join(MODES)}")
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; expected one of {', '.join(FALLBACKS)}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (B, D), got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] == 0:
        raise ValueError("cannot mine an empty batch")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must be (B,) with B={embeddings.shape[0]}, got shape {tuple(labels.shape)}")
    if (memory_embeddings is None) != (memory_labels is None):
        raise ValueError("memory_embeddings and memory_labels come together (or not at all)")
    if memory_embeddings is not None:
        if memory_embeddings.dim() != 2 or memory_embeddings.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"memory_embeddings must be (M, {embeddings.shape[1]}), got shape {tuple(memory_embeddings.shape)}"
            )
        if memory_labels.dim() != 1 or memory_labels.shape[0] != memory_embeddings.shape[0]:
            raise ValueError(
                f"memory_labels must be (M,) with M={memory_embeddings.shape[0]}, "
                f"got shape {tuple(memory_labels.shape)}"
            )


@dataclass(frozen=True)
class _Layout:
    """Who is a positive/negative of whom, without B×B masks where they are not needed.

    Candidates (the batch, then any memory rows: N = B + M) are sorted by label once
    (1-D), so each class is a contiguous block of ``order``: anchor a's positives are
    its block minus itself, its negatives the rest.  The anchor-positive pairs are
    laid out as a (B, P) matrix, P = largest class size - 1, which is ≤ B·N cells
    (3B with classes of 4 and no memory) instead of scanning all B·N cells.
    """

    labels: Tensor  # (B,) the anchors' labels
    candidate_labels: Tensor  # (N,) the batch's labels, then the memory's
    order: Tensor  # (N,) candidate indices sorted by label (stable)
    start: Tensor  # (B,) where each anchor's class block starts in ``order``
    size: Tensor  # (B,) class size of each anchor among the candidates
    n_neg: Tensor  # (B,) negatives per anchor
    anchors: Tensor  # (B,) bool: has a positive and a negative
    pos_idx: Tensor  # (B, P) positive candidate indices (junk where not valid)
    valid: Tensor  # (B, P) bool: real anchor-positive pair of a usable anchor

    def neg_mask(self) -> Tensor:
        return self.labels[:, None] != self.candidate_labels[None, :]


def _layout(labels: Tensor, memory_labels: Tensor | None = None) -> _Layout:
    b = labels.shape[0]
    candidates = labels if memory_labels is None else torch.cat([labels, memory_labels.to(labels.device)])
    n = candidates.shape[0]
    order = torch.argsort(candidates, stable=True)
    _, cls_sorted, counts = torch.unique_consecutive(candidates[order], return_inverse=True, return_counts=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=labels.device)
    rank = rank[:b]  # anchors are the first B candidates
    cls = cls_sorted[rank]
    start = (counts.cumsum(0) - counts)[cls]
    size = counts[cls]
    n_pos, n_neg = size - 1, n - size
    anchors = (n_pos > 0) & (n_neg > 0)
    p_max = max(int(n_pos.max()), 1)  # one host sync, to size the layout
    j = torch.arange(p_max, device=labels.device)
    within = rank - start  # the anchor's own slot in its block, skipped below
    col = start[:, None] + j + (j >= within[:, None]).long()
    pos_idx = order[col.clamp(max=n - 1)]
    valid = (j < n_pos[:, None]) & anchors[:, None]
    return _Layout(labels, candidates, order, start, size, n_neg, anchors, pos_idx, valid)


def _sorted_negatives(dist: Tensor, lay: _Layout, margin: float) -> tuple[Tensor, Tensor]:
    """Each row's negative distances ascending, non-negatives pushed to the end.

    The filler is a finite sentinel larger than any ``d(a,p) + margin`` so that
    searchsorted never counts it and no inf ever enters a differentiated op.
    """
    sentinel = dist.detach().max() + abs(float(margin)) + 1.0
    return dist.where(lay.neg_mask(), sentinel).sort(dim=1)


def _closest_negative(dist: Tensor, lay: _Layout) -> tuple[Tensor, Tensor]:
    """Per anchor: distance and index of the closest negative (one B×B pass, no sort)."""
    far = dist.detach().max() + 1.0
    return dist.where(lay.neg_mask(), far).min(dim=1)


def _pair_negatives(
    dist: Tensor,
    d_ap: Tensor,
    lay: _Layout,
    mode: str,
    margin: float,
    fallback: str,
    generator: torch.Generator | None,
    sorted_neg: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """For every (a, p) slot of the layout: the chosen negative's distance and index, (B, P) each."""
    b, p = d_ap.shape
    n = dist.shape[1]
    last = (lay.n_neg - 1).clamp(min=0)[:, None]
    if mode == "hard-negative":
        d_an, n_idx = _closest_negative(dist, lay)
        return d_an[:, None].expand(b, p), n_idx[:, None].expand(b, p)
    if mode == "random":
        # k-th negative in label order: skip over the anchor's own class block.
        u = torch.rand((b, p), generator=generator, device=dist.device)
        k = torch.minimum((u * lay.n_neg[:, None]).long(), last)
        k = k + lay.size[:, None] * (k >= lay.start[:, None]).long()
        n_idx = lay.order[k.clamp(max=n - 1)]
        return dist.gather(1, n_idx), n_idx
    # semi-hard: the closest negative strictly farther than the positive.
    values, indices = sorted_neg if sorted_neg is not None else _sorted_negatives(dist, lay, margin)
    col = torch.searchsorted(values.detach(), d_ap.detach().contiguous(), right=True)
    fb = torch.zeros_like(last) if fallback == "hardest" else last
    col = torch.where(col < lay.n_neg[:, None], col, fb)
    return values.gather(1, col), indices.gather(1, col)


def _prepare(
    embeddings: Tensor,
    labels: Tensor,
    mode: str,
    distance: str,
    fallback: str,
    memory_embeddings: Tensor | None,
    memory_labels: Tensor | None,
):
    _check(embeddings, labels, mode, fallback, memory_embeddings, memory_labels)
    if memory_embeddings is not None and memory_embeddings.shape[0] == 0:
        memory_embeddings = memory_labels = None  # an empty memory is today's in-batch mining, exactly
    dist = pairwise_distances(embeddings, distance, memory_embeddings)
    lay = _layout(labels.to(dist.device), None if memory_labels is None else memory_labels.to(dist.device))
    return dist, lay


def mine(
    embeddings: Tensor,
    labels: Tensor,
    mode: str,
    margin: float,
    distance: str = "euclidean",
    fallback: str = "hardest",
    generator: torch.Generator | None = None,
    memory_embeddings: Tensor | None = None,
    memory_labels: Tensor | None = None,
) -> tuple[Tensor, MiningStats]:
    """Mine triplets in one batch and return (differentiable scalar loss, stats).

    Loss per triplet is ``relu(d(a,p) - d(a,n) + margin)``, averaged over the
    mode's triplets (batch-all: over the active ones).  Anchors without a
    positive or a negative are skipped; with nothing valid the loss is a zero
    that is still connected to ``embeddings``.

    ``memory_embeddings`` (M, D) and ``memory_labels`` (M,): extra candidates
    (positives and negatives) for the batch's anchors, never anchors themselves,
    never differentiated.  ``stats.batch_hard_loss`` stays the in-batch one.
    """
    dist, lay = _prepare(embeddings, labels, mode, distance, fallback, memory_embeddings, memory_labels)
    zero = dist.new_zeros(())
    valid = lay.valid
    d_ap = dist.gather(1, lay.pos_idx)  # (B, P) anchor-positive distances
    sorted_neg = _sorted_negatives(dist, lay, margin) if mode in ("semi-hard", "batch-all") else None

    # Batch-hard is the yardstick in every mode (compare phases on the hardest task);
    # outside batch-hard mode it is computed without graph.
    with torch.set_grad_enabled(mode == "batch-hard" and torch.is_grad_enabled()):
        src = d_ap if mode == "batch-hard" else d_ap.detach()
        bh_ap = src.where(valid, -1.0).max(dim=1).values
        if sorted_neg is not None:
            bh_an = sorted_neg[0][:, 0].detach()
        else:
            bh_an = _closest_negative(dist if mode == "batch-hard" else dist.detach(), lay)[0]
        bh_terms = torch.relu(bh_ap - bh_an + margin).where(lay.anchors, zero)
    n_anchors = lay.anchors.sum()
    memory_rows = dist.shape[1] - dist.shape[0]
    if memory_rows:  # the logged yardstick stays in-batch, so phases with and without memory compare
        with torch.no_grad():
            in_batch, ib_dist = _layout(lay.labels), dist[:, : dist.shape[0]].detach()
            ib_ap = ib_dist.gather(1, in_batch.pos_idx).where(in_batch.valid, -1.0).max(dim=1).values
            ib_an = _closest_negative(ib_dist, in_batch)[0]
            ib_loss = torch.relu(ib_ap - ib_an + margin).where(
                in_batch.anchors, zero
            ).sum() / in_batch.anchors.sum().clamp(min=1)

    if mode == "batch-hard":
        n_trip = n_anchors
        loss = bh_terms.sum() / n_trip.clamp(min=1)
        with torch.no_grad():
            active = (bh_terms > 0).sum()
            sum_ap = bh_ap.where(lay.anchors, zero).sum()
            sum_an = bh_an.where(lay.anchors, zero).sum()
    elif mode == "batch-all":
        values = sorted_neg[0]
        query = d_ap + margin
        # Negatives with d(a,n) < d(a,p) + margin are exactly the active ones;
        # their summed loss is k*(d_ap + margin) - (sum of the k smallest d_an).
        k = torch.searchsorted(values.detach(), query.detach().contiguous(), right=False)
        prefix = torch.cat([values.new_zeros((values.shape[0], 1)), values.cumsum(dim=1)], dim=1)
        pair_sum = (k.to(dist.dtype) * query - prefix.gather(1, k)).where(valid, zero)
        active = k.where(valid, torch.zeros_like(k)).sum()
        loss = pair_sum.sum() / active.clamp(min=1).to(dist.dtype)
        with torch.no_grad():
            n_neg = lay.n_neg.to(dist.dtype)
            n_pos = valid.sum(1).to(dist.dtype)
            n_trip = (valid.sum(1) * lay.n_neg).sum()
            sum_ap = (d_ap.where(valid, zero).sum(1) * n_neg).sum()
            neg_total = prefix.gather(1, lay.n_neg[:, None]).squeeze(1)  # all of a row's negatives
            sum_an = (neg_total * n_pos).sum()
    else:
        d_an, _ = _pair_negatives(dist, d_ap, lay, mode, margin, fallback, generator, sorted_neg)
        terms = torch.relu(d_ap - d_an + margin).where(valid, zero)
        n_trip = valid.sum()
        loss = terms.sum() / n_trip.clamp(min=1).to(dist.dtype)
        with torch.no_grad():
            active = (terms > 0).sum()
            sum_ap = d_ap.where(valid, zero).sum()
            sum_an = d_an.where(valid, zero).sum()

    with torch.no_grad():
        e = _working_dtype(embeddings.detach())
        spread = (e - e.mean(0)).pow(2).sum(1).mean().sqrt()
        bh_loss = ib_loss if memory_rows else bh_terms.detach().sum() / n_anchors.clamp(min=1)
        denom = n_trip.clamp(min=1).to(dist.dtype)
        # One host transfer for all the numbers.
        nums = torch.stack(
            [
                loss.detach().to(dist.dtype),
                bh_loss.to(dist.dtype),
                active.to(dist.dtype) / denom,
                sum_ap.detach() / denom,
                sum_an.detach() / denom,
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
        memory_rows=memory_rows,
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
    memory_embeddings: Tensor | None = None,
    memory_labels: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The mined triplets as (anchor, positive, negative) index vectors, for inspection and tests.

    Same selection as ``mine`` (same generator state → same triplets).  With a
    memory, positive and negative indices count the batch first (0..B-1), then the
    memory rows (B..B+M-1).  Not for ``batch-all``: it uses every active triplet,
    which is O(B³) to list.
    """
    if mode == "batch-all":
        raise ValueError("batch-all uses every active triplet; there is no O(B²) list to return")
    with torch.no_grad():
        dist, lay = _prepare(embeddings, labels, mode, distance, fallback, memory_embeddings, memory_labels)
        d_ap = dist.gather(1, lay.pos_idx)
        if mode == "batch-hard":
            slot = d_ap.where(lay.valid, -1.0).argmax(dim=1)
            _, n_idx = _closest_negative(dist, lay)
            a = lay.anchors.nonzero().squeeze(1)
            return a, lay.pos_idx[a, slot[a]], n_idx[a]
        _, n_idx = _pair_negatives(dist, d_ap, lay, mode, margin, fallback, generator, None)
        a, j = lay.valid.nonzero(as_tuple=True)
        return a, lay.pos_idx[a, j], n_idx[a, j]
