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

The loss (`loss=`, train/losses.py) scores the mined triplets (`margin`, `soft-margin`) or the whole
batch (`infonce`, which mines nothing); the false-negative guard (`guard=`, train/guard.py) takes
the closest candidates out of the hard modes' and InfoNCE's choice."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from tripletctl.config.choices import FALLBACKS, GUARDED_MODES, INFONCE_MINING, LOSSES
from tripletctl.config.choices import MINING_MODES as MODES
from tripletctl.model.distances import pairwise_distances, working_dtype
from tripletctl.train import guard as fn_guard
from tripletctl.train import losses


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
    guard_skipped: int = 0  # candidate negatives the false-negative guard skipped, summed over pairs/anchors


def _check(
    embeddings: Tensor,
    labels: Tensor,
    mode: str,
    fallback: str,
    memory_embeddings: Tensor | None = None,
    memory_labels: Tensor | None = None,
    loss: str = "margin",
    guard: float | None = None,
) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mining mode {mode!r}; expected one of {', '.join(MODES)}")
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; expected one of {', '.join(FALLBACKS)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    if loss == "soft-margin" and mode == "batch-all":
        raise ValueError("soft-margin has no batch-all form: every triplet is active and there is no O(B²) sum")
    if guard is not None and loss != "infonce" and mode not in GUARDED_MODES:
        raise ValueError(f"the false-negative guard applies to {', '.join(GUARDED_MODES)} and infonce, not {mode}")
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


class _Batch:
    """One batch as every mode sees it: distances, layout, anchor-positive distances and the settings.
    The sorted negatives are computed once, when a mode (semi-hard, batch-all) first asks for them."""

    def __init__(
        self,
        dist: Tensor,
        lay: _Layout,
        margin: float,
        fallback: str,
        generator: torch.Generator | None,
        loss: str = "margin",
        guard: float | None = None,
        distance: str = "euclidean",
    ):
        self.dist, self.lay, self.margin, self.fallback, self.generator = dist, lay, margin, fallback, generator
        self.loss, self.guard, self.distance = loss, guard, distance
        self.d_ap = dist.gather(1, lay.pos_idx)  # (B, P) anchor-positive distances
        self.zero = dist.new_zeros(())
        self._sorted: tuple[Tensor, Tensor] | None = None

    @property
    def sorted_negatives(self) -> tuple[Tensor, Tensor]:
        if self._sorted is None:
            self._sorted = _sorted_negatives(self.dist, self.lay, self.margin)
        return self._sorted


@dataclass(frozen=True)
class _Mined:
    """What a mode returns: its loss and the sums its statistics are made of."""

    loss: Tensor
    num_triplets: Tensor  # triplets the loss averages over
    active: Tensor  # ... of which with loss > 0
    sum_ap: Tensor  # sum of d(a,p) over the mode's triplets
    sum_an: Tensor  # sum of d(a,n)
    batch_hard_terms: Tensor | None = None  # batch-hard's own per-anchor terms: the yardstick, not computed again
    guard_skipped: Tensor | None = None  # negatives the false-negative guard skipped


def _prepare(
    embeddings: Tensor,
    labels: Tensor,
    mode: str,
    distance: str,
    fallback: str,
    memory_embeddings: Tensor | None,
    memory_labels: Tensor | None,
    loss: str = "margin",
    guard: float | None = None,
):
    _check(embeddings, labels, mode, fallback, memory_embeddings, memory_labels, loss, guard)
    if memory_embeddings is not None and memory_embeddings.shape[0] == 0:
        memory_embeddings = memory_labels = None  # an empty memory is today's in-batch mining, exactly
    dist = pairwise_distances(embeddings, distance, memory_embeddings)
    lay = _layout(labels.to(dist.device), None if memory_labels is None else memory_labels.to(dist.device))
    return dist, lay, memory_embeddings


def _hardest_negatives(batch: _Batch) -> tuple[Tensor, Tensor]:
    """hard-negative: every pair of an anchor gets the anchor's closest negative."""
    b, p = batch.d_ap.shape
    d_an, n_idx = _closest_negative(batch.dist, batch.lay)
    return d_an[:, None].expand(b, p), n_idx[:, None].expand(b, p)


def _random_negatives(batch: _Batch) -> tuple[Tensor, Tensor]:
    """random: a uniformly drawn negative per pair (the k-th in label order, skipping the anchor's class)."""
    lay, n = batch.lay, batch.dist.shape[1]
    last = (lay.n_neg - 1).clamp(min=0)[:, None]
    u = torch.rand(batch.d_ap.shape, generator=batch.generator, device=batch.dist.device)
    k = torch.minimum((u * lay.n_neg[:, None]).long(), last)
    k = k + lay.size[:, None] * (k >= lay.start[:, None]).long()
    n_idx = lay.order[k.clamp(max=n - 1)]
    return batch.dist.gather(1, n_idx), n_idx


def _semi_hard_negatives(batch: _Batch) -> tuple[Tensor, Tensor]:
    """semi-hard (FaceNet): the closest negative strictly farther than the positive; where there is
    none, the fallback: the hardest (closest) negative, or the easiest (farthest)."""
    lay = batch.lay
    last = (lay.n_neg - 1).clamp(min=0)[:, None]
    values, indices = batch.sorted_negatives
    col = torch.searchsorted(values.detach(), batch.d_ap.detach().contiguous(), right=True)
    fallback = torch.zeros_like(last) if batch.fallback == "hardest" else last
    col = torch.where(col < lay.n_neg[:, None], col, fallback)
    return values.gather(1, col), indices.gather(1, col)


# How the per-pair modes choose each pair's negative: (B, P) distances and candidate indices.
PAIR_NEGATIVES = {"random": _random_negatives, "semi-hard": _semi_hard_negatives, "hard-negative": _hardest_negatives}


def _guarded_pair_negatives(batch: _Batch, mode: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """semi-hard / hard-negative under the guard: each pair's skipped negatives are a prefix of the
    sorted row, so its choice starts at the first kept column. Also: which pairs kept a negative,
    and the number skipped."""
    lay, n_neg = batch.lay, batch.lay.n_neg[:, None]
    values, indices = batch.sorted_negatives
    limit = fn_guard.distance_limit(batch.d_ap, batch.guard, batch.distance)
    first = fn_guard.skipped_in_sorted(values, limit, lay.n_neg)  # (B, P): the first kept column
    col = first
    if mode == "semi-hard":
        col = torch.maximum(torch.searchsorted(values.detach(), batch.d_ap.detach().contiguous(), right=True), first)
        fallback = first if batch.fallback == "hardest" else (n_neg - 1).clamp(min=0).expand_as(first)
        col = torch.where(col < n_neg, col, fallback)
    col = col.clamp(max=values.shape[1] - 1)
    skipped = first.where(lay.valid, torch.zeros_like(first)).sum()
    return values.gather(1, col), indices.gather(1, col), first < n_neg, skipped


def _batch_hard_terms(batch: _Batch, detached: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per anchor: the hardest positive's and the hardest negative's distance, and relu(ap - an + margin)."""
    d_ap, dist = (batch.d_ap.detach(), batch.dist.detach()) if detached else (batch.d_ap, batch.dist)
    bh_ap = d_ap.where(batch.lay.valid, -1.0).max(dim=1).values
    if batch._sorted is not None:  # already sorted: its first column is the closest negative
        bh_an = batch._sorted[0][:, 0].detach() if detached else batch._sorted[0][:, 0]
    else:
        bh_an = _closest_negative(dist, batch.lay)[0]
    return bh_ap, bh_an, torch.relu(bh_ap - bh_an + batch.margin).where(batch.lay.anchors, batch.zero)


def _mine_batch_hard(batch: _Batch) -> _Mined:
    """Hermans et al.: per anchor, its hardest positive against its hardest negative (under the guard:
    the closest negative the hardest positive's limit keeps; an anchor with none left is skipped)."""
    anchors, zero, skipped = batch.lay.anchors, batch.zero, None
    if batch.guard is None:
        bh_ap, bh_an, terms = _batch_hard_terms(batch, detached=False)
    else:
        bh_ap = batch.d_ap.where(batch.lay.valid, -1.0).max(dim=1).values
        limit = fn_guard.distance_limit(bh_ap, batch.guard, batch.distance)
        bh_an, _, kept, skipped_rows = fn_guard.closest_kept(batch.dist, batch.lay.neg_mask(), limit)
        anchors, skipped = anchors & kept, skipped_rows.where(anchors, torch.zeros_like(skipped_rows)).sum()
    if batch.loss != "margin" or batch.guard is not None:
        terms = losses.TRIPLET_LOSSES[batch.loss](bh_ap, bh_an, batch.margin).where(anchors, zero)
    n_anchors = anchors.sum()
    with torch.no_grad():
        sums = (
            losses.active(batch.loss, terms, bh_ap, bh_an, anchors).sum(),
            bh_ap.where(anchors, zero).sum(),
            bh_an.where(anchors, zero).sum(),
        )
    # batch-hard's own margin terms are the yardstick; other losses and the guard change them
    yardstick = terms.detach() if batch.loss == "margin" and batch.guard is None else None
    return _Mined(terms.sum() / n_anchors.clamp(min=1), n_anchors, *sums, yardstick, skipped)


def _mine_batch_all(batch: _Batch) -> _Mined:
    """Every valid triplet; the loss is the mean over the active ones, summed without a B×B×B tensor."""
    if batch.guard is not None:
        return _mine_batch_all_guarded(batch)
    dist, lay, d_ap, zero, valid = batch.dist, batch.lay, batch.d_ap, batch.zero, batch.lay.valid
    values = batch.sorted_negatives[0]
    query = d_ap + batch.margin
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
    return _Mined(loss, n_trip, active, sum_ap, sum_an)


def _mine_batch_all_guarded(batch: _Batch) -> _Mined:
    """Batch-all under the guard: pair (a, p) keeps the sorted negatives from its first kept column
    `g` on, so its active ones are columns g..k-1 and their sum is (k-g)·(d_ap + margin) - (S[k] - S[g])."""
    dist, lay, d_ap, zero, valid = batch.dist, batch.lay, batch.d_ap, batch.zero, batch.lay.valid
    values = batch.sorted_negatives[0]
    query = d_ap + batch.margin
    first = fn_guard.skipped_in_sorted(values, fn_guard.distance_limit(d_ap, batch.guard, batch.distance), lay.n_neg)
    k = torch.maximum(torch.searchsorted(values.detach(), query.detach().contiguous(), right=False), first)
    prefix = torch.cat([values.new_zeros((values.shape[0], 1)), values.cumsum(dim=1)], dim=1)
    pair_sum = ((k - first).to(dist.dtype) * query - (prefix.gather(1, k) - prefix.gather(1, first))).where(valid, zero)
    active = (k - first).where(valid, torch.zeros_like(k)).sum()
    loss = pair_sum.sum() / active.clamp(min=1).to(dist.dtype)
    with torch.no_grad():
        n_neg = lay.n_neg[:, None].expand_as(first)
        kept = (n_neg - first).where(valid, torch.zeros_like(first))
        sum_ap = (d_ap.where(valid, zero) * kept.to(dist.dtype)).sum()
        sum_an = (prefix.gather(1, n_neg) - prefix.gather(1, first)).where(valid, zero).sum()
        skipped = first.where(valid, torch.zeros_like(first)).sum()
    return _Mined(loss, kept.sum(), active, sum_ap, sum_an, guard_skipped=skipped)


def _per_pair(batch: _Batch, mode: str) -> _Mined:
    """One negative per anchor-positive pair, chosen as `mode` says (PAIR_NEGATIVES); under the guard,
    pairs whose negatives were all skipped are left out."""
    d_ap, valid, zero, skipped = batch.d_ap, batch.lay.valid, batch.zero, None
    if batch.guard is None:
        d_an, _ = PAIR_NEGATIVES[mode](batch)
    else:
        d_an, _, kept, skipped = _guarded_pair_negatives(batch, mode)
        valid = valid & kept
    terms = losses.TRIPLET_LOSSES[batch.loss](d_ap, d_an, batch.margin).where(valid, zero)
    n_trip = valid.sum()
    with torch.no_grad():
        sums = (
            losses.active(batch.loss, terms, d_ap, d_an, valid).sum(),
            d_ap.where(valid, zero).sum(),
            d_an.where(valid, zero).sum(),
        )
    return _Mined(terms.sum() / n_trip.clamp(min=1).to(batch.dist.dtype), n_trip, *sums, guard_skipped=skipped)


def _mine_infonce(batch: _Batch, embeddings: Tensor, memory: Tensor | None, temperature: float) -> _Mined:
    """InfoNCE over the (global) batch and the memory; its stats read the (detached) distances."""
    lay = batch.lay
    sim = losses.cosine_similarities(embeddings, memory)
    out = losses.infonce(sim, lay.pos_idx, lay.valid, lay.neg_mask(), temperature, batch.guard)
    with torch.no_grad():
        sum_ap = batch.d_ap.where(out.pairs, batch.zero).sum()
        sum_an = batch.dist.gather(1, out.hardest).where(out.pairs, batch.zero).sum()
    skipped = None if batch.guard is None else out.skipped
    return _Mined(out.loss, out.pairs.sum(), out.misranked, sum_ap, sum_an, guard_skipped=skipped)


# One function per mining mode: a new mode is a function here and its name in config/choices.py.
MODE_FUNCTIONS = {
    **{mode: functools.partial(_per_pair, mode=mode) for mode in PAIR_NEGATIVES},
    "batch-hard": _mine_batch_hard,
    "batch-all": _mine_batch_all,
}


def _in_batch_hard_loss(batch: _Batch) -> Tensor:
    """The batch-hard yardstick over the batch's own rows only (a memory's rows left out), no graph."""
    with torch.no_grad():
        b = batch.dist.shape[0]
        in_batch, dist = _layout(batch.lay.labels), batch.dist[:, :b].detach()
        hardest_ap = dist.gather(1, in_batch.pos_idx).where(in_batch.valid, -1.0).max(dim=1).values
        hardest_an = _closest_negative(dist, in_batch)[0]
        terms = torch.relu(hardest_ap - hardest_an + batch.margin).where(in_batch.anchors, batch.zero)
        return terms.sum() / in_batch.anchors.sum().clamp(min=1)


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
    loss: str = "margin",
    temperature: float = 0.05,
    guard: float | None = None,
) -> tuple[Tensor, MiningStats]:
    """Mine triplets in one batch and return (differentiable scalar loss, stats).

    Loss per triplet is ``relu(d(a,p) - d(a,n) + margin)`` (``loss="soft-margin"``:
    ``softplus(d(a,p) - d(a,n))``), averaged over the mode's triplets (batch-all:
    over the active ones).  ``loss="infonce"`` scores the whole batch instead
    (``mode`` must be batch-all, ``temperature`` τ).  Anchors without a positive or
    a negative are skipped; with nothing valid the loss is a zero that is still
    connected to ``embeddings``.

    ``memory_embeddings`` (M, D) and ``memory_labels`` (M,): extra candidates
    (positives and negatives) for the batch's anchors, never anchors themselves,
    never differentiated.  ``guard`` ρ skips negatives with sim(a,n) > ρ·sim(a,p).
    ``stats.batch_hard_loss`` stays the plain (margin, unguarded) in-batch one.
    """
    if loss == "infonce" and mode != INFONCE_MINING:
        raise ValueError(f"infonce uses every positive and negative: mining must be {INFONCE_MINING}, got {mode}")
    # with infonce the distances only feed the stats and the yardstick: no graph
    with torch.no_grad() if loss == "infonce" else contextlib.nullcontext():
        dist, lay, memory = _prepare(
            embeddings, labels, mode, distance, fallback, memory_embeddings, memory_labels, loss, guard
        )
    batch = _Batch(dist, lay, margin, fallback, generator, loss, guard, distance)
    if loss == "infonce":
        mined = _mine_infonce(batch, embeddings, memory, temperature)
    else:
        mined = MODE_FUNCTIONS[mode](batch)
    # Batch-hard is the yardstick in every mode (compare phases on the hardest task), without graph.
    memory_rows = dist.shape[1] - dist.shape[0]
    if memory_rows:  # the logged yardstick stays in-batch, so phases with and without memory compare
        batch_hard_loss = _in_batch_hard_loss(batch)
    else:
        terms = mined.batch_hard_terms
        if terms is None:
            terms = _batch_hard_terms(batch, detached=True)[2]
        batch_hard_loss = terms.sum() / lay.anchors.sum().clamp(min=1)
    return mined.loss, _stats(embeddings, labels, batch, mined, batch_hard_loss, memory_rows)


def _stats(
    embeddings: Tensor, labels: Tensor, batch: _Batch, mined: _Mined, batch_hard_loss: Tensor, memory_rows: int
) -> MiningStats:
    """The step's numbers, brought to the host in one transfer."""
    dtype = batch.dist.dtype
    with torch.no_grad():
        e = working_dtype(embeddings.detach())
        spread = (e - e.mean(0)).pow(2).sum(1).mean().sqrt()
        denom = mined.num_triplets.clamp(min=1).to(dtype)
        nums = torch.stack(
            [
                mined.loss.detach().to(dtype),
                batch_hard_loss.to(dtype),
                mined.active.to(dtype) / denom,
                mined.sum_ap.detach() / denom,
                mined.sum_an.detach() / denom,
                mined.num_triplets.to(dtype),
                (labels.shape[0] - batch.lay.anchors.sum()).to(dtype),
                spread.to(dtype),
                (mined.guard_skipped if mined.guard_skipped is not None else mined.num_triplets * 0).to(dtype),
            ]
        ).tolist()
    return MiningStats(
        loss=nums[0],
        batch_hard_loss=nums[1],
        active_fraction=nums[2],
        mean_ap=nums[3],
        mean_an=nums[4],
        num_triplets=int(round(nums[5])),
        skipped_anchors=int(round(nums[6])),
        embedding_spread=nums[7],
        memory_rows=memory_rows,
        guard_skipped=int(round(nums[8])) if mined.guard_skipped is not None else 0,
    )


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
    guard: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The mined triplets as (anchor, positive, negative) index vectors, for inspection and tests.

    Same selection as ``mine`` (same generator state → same triplets, same
    ``guard``).  With a memory, positive and negative indices count the batch first
    (0..B-1), then the memory rows (B..B+M-1).  Not for ``batch-all``: it uses
    every active triplet, which is O(B³) to list.
    """
    if mode == "batch-all":
        raise ValueError("batch-all uses every active triplet; there is no O(B²) list to return")
    with torch.no_grad():
        dist, lay, _ = _prepare(
            embeddings, labels, mode, distance, fallback, memory_embeddings, memory_labels, guard=guard
        )
        batch = _Batch(dist, lay, margin, fallback, generator, guard=guard, distance=distance)
        if mode == "batch-hard":
            slot = batch.d_ap.where(lay.valid, -1.0).argmax(dim=1)
            anchors = lay.anchors
            if guard is None:
                _, n_idx = _closest_negative(dist, lay)
            else:
                limit = fn_guard.distance_limit(batch.d_ap.gather(1, slot[:, None])[:, 0], guard, distance)
                _, n_idx, kept, _ = fn_guard.closest_kept(dist, lay.neg_mask(), limit)
                anchors = anchors & kept
            a = anchors.nonzero().squeeze(1)
            return a, lay.pos_idx[a, slot[a]], n_idx[a]
        valid = lay.valid
        if guard is None:
            _, n_idx = PAIR_NEGATIVES[mode](batch)
        else:
            _, n_idx, kept, _ = _guarded_pair_negatives(batch, mode)
            valid = valid & kept
        a, j = valid.nonzero(as_tuple=True)
        return a, lay.pos_idx[a, j], n_idx[a, j]
