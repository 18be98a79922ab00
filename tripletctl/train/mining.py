"""Online triplet mining: pure tensor functions over one batch of embeddings.

Everything works on the B×B distance matrix, one B×B per-row sort and a (B, P)
layout of the anchor-positive pairs (P = largest class - 1), so memory is O(B²)
in every mode and for every class structure: no B×B×B tensor is ever built, not
even for batch-all (see ``docs/mining.md`` for the prefix-sum trick).

Anchor-positive pairs: every ordered (a, p), a != p, of one label; a's negatives: every other label.

With a cross-batch memory (``memory_embeddings``/``memory_labels``: M detached
rows of earlier batches) the anchors stay the B batch rows but the candidates
are batch ∪ memory: the matrices become B×(B+M), still never three-way, and no
gradient reaches the memory rows.

The loss (`loss=`) is found in its registry (train/losses.py): a triplet loss scores the triplets
the mode chose, a batch loss scores the whole batch and mines nothing; which modes, guard and memory
each goes with is config/loss_rules.py's table, read here by `_check`. The false-negative guard
(`guard=`, train/guard.py) is applied once, as a filter on each pair's candidate negatives
(`_Batch.kept_from`), before any mode chooses among them."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from tripletctl.config.choices import FALLBACKS, LOSSES
from tripletctl.config.choices import MINING_MODES as MODES
from tripletctl.config.loss_rules import DEFAULT_LOSS, refusals
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
    loss: str = DEFAULT_LOSS,
    guard: float | None = None,
    hardness: float = 0.0,
) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mining mode {mode!r}; expected one of {', '.join(MODES)}")
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; expected one of {', '.join(FALLBACKS)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    refused = refusals(loss, mode, guard is not None, memory_embeddings is not None, hardness=hardness != 0)
    if refused:
        raise ValueError(refused[0][0])
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
    What more than one mode reads (the sorted negatives, the closest negatives, the guard's filter) is
    computed once, when first asked for."""

    def __init__(
        self,
        dist: Tensor,
        lay: _Layout,
        margin: float,
        fallback: str,
        generator: torch.Generator | None,
        loss: str = DEFAULT_LOSS,
        guard: float | None = None,
        distance: str = "euclidean",
        hardness: float = 0.0,
    ):
        self.dist, self.lay, self.margin, self.fallback, self.generator = dist, lay, margin, fallback, generator
        self.loss, self.guard, self.distance, self.hardness = loss, guard, distance, hardness
        self.d_ap = dist.gather(1, lay.pos_idx)  # (B, P) anchor-positive distances
        self.zero = dist.new_zeros(())
        self._sorted: tuple[Tensor, Tensor] | None = None

    @property
    def sorted_negatives(self) -> tuple[Tensor, Tensor]:
        if self._sorted is None:
            self._sorted = _sorted_negatives(self.dist, self.lay, self.margin)
        return self._sorted

    @functools.cached_property
    def closest_negative(self) -> tuple[Tensor, Tensor]:
        return _closest_negative(self.dist, self.lay)

    @functools.cached_property
    def kept_from(self) -> Tensor:
        """The false-negative guard, applied once for every mode: per anchor-positive pair (B, P), the
        column of its sorted row where the negatives it keeps begin. The skipped ones are the pair's
        closest, a prefix of the row (train/guard.py), so `kept_from == n_neg` leaves none. Without
        the guard, 0: every negative is kept."""
        if self.guard is None:
            return torch.zeros_like(self.lay.pos_idx)
        limit = fn_guard.distance_limit(self.d_ap, self.guard, self.distance)
        return fn_guard.skipped_in_sorted(self.sorted_negatives[0], limit, self.lay.n_neg)

    @functools.cached_property
    def kept_pairs(self) -> Tensor:
        """(B, P) bool: the valid pairs with a negative left after the guard."""
        return self.lay.valid & (self.kept_from < self.lay.n_neg[:, None])

    def closest_kept(self, first: Tensor) -> tuple[Tensor, Tensor]:
        """Distance and index of the closest kept negative of rows whose kept negatives begin at
        `first` (B, K) of the sorted rows; without the guard, each anchor's closest negative (one
        masked min, no sort)."""
        if self.guard is None:
            values, indices = self.closest_negative
            return values[:, None].expand_as(first), indices[:, None].expand_as(first)
        values, indices = self.sorted_negatives
        col = first.clamp(max=values.shape[1] - 1)
        return values.gather(1, col), indices.gather(1, col)

    def skipped(self, first: Tensor, rows: Tensor) -> Tensor | None:
        """`guard_skipped`: the negatives the guard skipped, summed over `rows`; None without it."""
        return None if self.guard is None else first.where(rows, torch.zeros_like(first)).sum()


@dataclass(frozen=True)
class _Mined:
    """What a mode returns: its loss and the sums its statistics are made of."""

    loss: Tensor
    num_triplets: Tensor  # triplets the loss averages over
    active: Tensor  # ... of which with loss > 0
    sum_ap: Tensor  # sum of d(a,p) over the mode's triplets
    sum_an: Tensor  # sum of d(a,n)
    guard_skipped: Tensor | None = None  # negatives the false-negative guard skipped


def _prepare(
    embeddings: Tensor,
    labels: Tensor,
    mode: str,
    distance: str,
    fallback: str,
    memory_embeddings: Tensor | None,
    memory_labels: Tensor | None,
    loss: str = DEFAULT_LOSS,
    guard: float | None = None,
    hardness: float = 0.0,
):
    _check(embeddings, labels, mode, fallback, memory_embeddings, memory_labels, loss, guard, hardness)
    if memory_embeddings is not None and memory_embeddings.shape[0] == 0:
        memory_embeddings = memory_labels = None  # an empty memory is today's in-batch mining, exactly
    dist = pairwise_distances(embeddings, distance, memory_embeddings)
    lay = _layout(labels.to(dist.device), None if memory_labels is None else memory_labels.to(dist.device))
    return dist, lay, memory_embeddings


def _hardest_negatives(batch: _Batch) -> tuple[Tensor, Tensor]:
    """hard-negative: every pair gets its closest kept negative."""
    return batch.closest_kept(batch.kept_from)


def _random_negatives(batch: _Batch) -> tuple[Tensor, Tensor]:
    """random: a uniformly drawn negative per pair (the k-th in label order, skipping the anchor's
    class); the guard does not apply (config/loss_rules.py)."""
    lay, n = batch.lay, batch.dist.shape[1]
    last = (lay.n_neg - 1).clamp(min=0)[:, None]
    u = torch.rand(batch.d_ap.shape, generator=batch.generator, device=batch.dist.device)
    k = torch.minimum((u * lay.n_neg[:, None]).long(), last)
    k = k + lay.size[:, None] * (k >= lay.start[:, None]).long()
    n_idx = lay.order[k.clamp(max=n - 1)]
    return batch.dist.gather(1, n_idx), n_idx


def _semi_hard_negatives(batch: _Batch) -> tuple[Tensor, Tensor]:
    """semi-hard (FaceNet): the closest kept negative strictly farther than the positive; where there
    is none, the fallback: the closest kept negative (hardest) or the farthest (easiest)."""
    first, n_neg = batch.kept_from, batch.lay.n_neg[:, None]
    values, indices = batch.sorted_negatives
    col = torch.maximum(torch.searchsorted(values.detach(), batch.d_ap.detach().contiguous(), right=True), first)
    fallback = first if batch.fallback == "hardest" else (n_neg - 1).clamp(min=0).expand_as(first)
    col = torch.where(col < n_neg, col, fallback).clamp(max=values.shape[1] - 1)
    return values.gather(1, col), indices.gather(1, col)


# How the per-pair modes choose each pair's negative: (B, P) distances and candidate indices.
PAIR_NEGATIVES = {"random": _random_negatives, "semi-hard": _semi_hard_negatives, "hard-negative": _hardest_negatives}


def _batch_hard_choice(batch: _Batch) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Hermans et al.: per anchor, its hardest (farthest) positive and the closest negative that this
    positive's guard keeps. Returns d(a,p), d(a,n), the negative's index, the positive's slot, the
    anchors used (one whose negatives were all skipped is left out) and where the kept ones begin."""
    bh_ap, slot = batch.d_ap.where(batch.lay.valid, -1.0).max(dim=1)
    first = batch.kept_from.gather(1, slot[:, None])
    bh_an, n_idx = batch.closest_kept(first)
    anchors = batch.lay.anchors & (first[:, 0] < batch.lay.n_neg)
    return bh_ap, bh_an[:, 0], n_idx[:, 0], slot, anchors, first[:, 0]


def _mine_batch_hard(batch: _Batch) -> _Mined:
    """batch-hard: the loss of each anchor's hardest positive against its closest kept negative."""
    bh_ap, bh_an, _, _, anchors, first = _batch_hard_choice(batch)
    terms = losses.TRIPLET_LOSSES[batch.loss](bh_ap, bh_an, batch.margin).where(anchors, batch.zero)
    n_anchors = anchors.sum()
    with torch.no_grad():
        sums = (
            losses.active(batch.loss, terms, bh_ap, bh_an, anchors).sum(),
            bh_ap.where(anchors, batch.zero).sum(),
            bh_an.where(anchors, batch.zero).sum(),
        )
    skipped = batch.skipped(first, batch.lay.anchors)
    return _Mined(terms.sum() / n_anchors.clamp(min=1), n_anchors, *sums, guard_skipped=skipped)


def _mine_batch_all(batch: _Batch) -> _Mined:
    """Every kept triplet; the loss is the mean over the active ones, summed without a B×B×B tensor.

    Pair (a, p) keeps its sorted negatives from column g = `kept_from` on (0 without the guard); the
    active ones, d(a,n) < d(a,p) + margin, are columns g..k-1, and with S the row's prefix sums their
    summed loss is (k - g)·(d(a,p) + margin) - (S[k] - S[g]) (docs/mining.md)."""
    dist, lay, d_ap, zero, valid = batch.dist, batch.lay, batch.d_ap, batch.zero, batch.lay.valid
    values, first = batch.sorted_negatives[0], batch.kept_from
    query = d_ap + batch.margin
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
    return _Mined(loss, kept.sum(), active, sum_ap, sum_an, guard_skipped=batch.skipped(first, valid))


def _per_pair(batch: _Batch, mode: str) -> _Mined:
    """One kept negative per anchor-positive pair, chosen as `mode` says (PAIR_NEGATIVES); pairs whose
    negatives the guard all skipped are left out."""
    d_ap, valid, zero = batch.d_ap, batch.kept_pairs, batch.zero
    d_an, _ = PAIR_NEGATIVES[mode](batch)
    terms = losses.TRIPLET_LOSSES[batch.loss](d_ap, d_an, batch.margin).where(valid, zero)
    n_trip = valid.sum()
    with torch.no_grad():
        sums = (
            losses.active(batch.loss, terms, d_ap, d_an, valid).sum(),
            d_ap.where(valid, zero).sum(),
            d_an.where(valid, zero).sum(),
        )
    skipped = batch.skipped(batch.kept_from, batch.lay.valid)
    return _Mined(terms.sum() / n_trip.clamp(min=1).to(batch.dist.dtype), n_trip, *sums, guard_skipped=skipped)


def _score_batch(batch: _Batch, embeddings: Tensor, memory: Tensor | None, temperature: float) -> _Mined:
    """A batch loss (losses.BATCH_LOSSES) over the (global) batch and the memory; its stats read the
    (detached) distances."""
    lay = batch.lay
    out = losses.BATCH_LOSSES[batch.loss](
        embeddings, memory, lay.pos_idx, lay.valid, lay.neg_mask(), temperature, batch.guard, batch.hardness
    )
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


def _yardstick(batch: _Batch) -> Tensor:
    """The plain (margin, unguarded) batch-hard loss over the batch's own rows, without graph: what
    every phase logs beside its own loss, and what the collapse watchdog reads. A memory's rows are
    left out, so phases with and without one compare."""
    with torch.no_grad():
        b = batch.dist.shape[0]
        if batch.dist.shape[1] > b:
            lay, dist = _layout(batch.lay.labels), batch.dist[:, :b].detach()
            hardest_ap = dist.gather(1, lay.pos_idx).where(lay.valid, -1.0).max(dim=1).values
            hardest_an = _closest_negative(dist, lay)[0]
        else:  # the closest negatives are already there: the sorted rows' first column, or the min
            lay = batch.lay
            hardest_ap = batch.d_ap.detach().where(lay.valid, -1.0).max(dim=1).values
            hardest_an = (batch._sorted[0][:, 0] if batch._sorted is not None else batch.closest_negative[0]).detach()
        terms = losses.margin_terms(hardest_ap, hardest_an, batch.margin).where(lay.anchors, batch.zero)
        return terms.sum() / lay.anchors.sum().clamp(min=1)


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
    loss: str = DEFAULT_LOSS,
    temperature: float = 0.05,
    guard: float | None = None,
    hardness: float = 0.0,
) -> tuple[Tensor, MiningStats]:
    """Mine triplets in one batch and return (differentiable scalar loss, stats).

    Loss per triplet is ``relu(d(a,p) - d(a,n) + margin)`` (``loss="soft-margin"``:
    ``softplus(d(a,p) - d(a,n))``), averaged over the mode's triplets (batch-all:
    over the active ones).  ``loss="infonce"`` scores the whole batch instead
    (``mode`` must be batch-all, ``temperature`` τ, ``hardness`` α).  Anchors without a positive or
    a negative are skipped; with nothing valid the loss is a zero that is still
    connected to ``embeddings``.

    ``memory_embeddings`` (M, D) and ``memory_labels`` (M,): extra candidates
    (positives and negatives) for the batch's anchors, never anchors themselves,
    never differentiated.  ``guard`` ρ skips negatives with sim(a,n) > ρ·sim(a,p).
    ``stats.batch_hard_loss`` stays the plain (margin, unguarded) in-batch one.
    """
    of_triplets = loss in losses.TRIPLET_LOSSES
    # a batch loss reads the distances only for its stats and the yardstick: no graph
    with contextlib.nullcontext() if of_triplets else torch.no_grad():
        dist, lay, memory = _prepare(
            embeddings, labels, mode, distance, fallback, memory_embeddings, memory_labels, loss, guard, hardness
        )
    batch = _Batch(dist, lay, margin, fallback, generator, loss, guard, distance, hardness)
    mined = MODE_FUNCTIONS[mode](batch) if of_triplets else _score_batch(batch, embeddings, memory, temperature)
    return mined.loss, _stats(embeddings, labels, batch, mined, _yardstick(batch), dist.shape[1] - dist.shape[0])


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
    if mode not in (*PAIR_NEGATIVES, "batch-hard"):
        raise ValueError(f"{mode} uses every active triplet; there is no O(B²) list to return")
    with torch.no_grad():
        dist, lay, _ = _prepare(
            embeddings, labels, mode, distance, fallback, memory_embeddings, memory_labels, guard=guard
        )
        batch = _Batch(dist, lay, margin, fallback, generator, guard=guard, distance=distance)
        if mode == "batch-hard":
            _, _, n_idx, slot, anchors, _ = _batch_hard_choice(batch)
            a = anchors.nonzero().squeeze(1)
            return a, lay.pos_idx[a, slot[a]], n_idx[a]
        _, n_idx = PAIR_NEGATIVES[mode](batch)
        a, j = batch.kept_pairs.nonzero(as_tuple=True)
        return a, lay.pos_idx[a, j], n_idx[a, j]
