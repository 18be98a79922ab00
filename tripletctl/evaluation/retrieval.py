"""Retrieval quality of an embedding model: recall@k, MAP@R, R-precision and triplet accuracy.

The maths (`retrieval_metrics`) is a pure function of an embedding matrix and labels. Nearest
neighbours are searched in chunks of queries so that memory is O(chunk_size x N): a held-out set of
a million rows never builds an N x N matrix. `evaluate_model` scores a model on labelled rows: the
held-out evals during training, `tripletctl eval` (commands/eval_command.py) and the Python API.

Definitions follow Musgrave, Belongie & Lim (2020), "A Metric Learning Reality Check":
for a query with R other items of its label, MAP@R = (1/R) * sum_{i<=R} P(i) * rel(i) and
R-precision = (same-label items among the R nearest) / R. Queries whose label appears only once
(R = 0) cannot be answered by any model, so they are left out of *every* retrieval metric and
counted in `excluded_queries`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tripletctl.core.errors import DataError, NonFiniteError
from tripletctl.model.encoder import encode

DEFAULT_KS = (1, 5, 10)
DEFAULT_MAX_LENGTH = 128


# --------------------------------------------------------------------------------------------
# pure maths


def _as_tensor(embeddings: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept numpy or torch; compute in float32 on the embeddings' device."""
    emb = torch.as_tensor(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(emb.shape)}")
    emb = emb.detach().to(torch.float32)
    lab = torch.as_tensor(labels).detach().to(device=emb.device, dtype=torch.int64).reshape(-1)
    if lab.shape[0] != emb.shape[0]:
        raise ValueError(f"{emb.shape[0]} embeddings but {lab.shape[0]} labels")
    return emb, lab


def _distance_block(queries: torch.Tensor, keys: torch.Tensor, keys_sq: torch.Tensor) -> torch.Tensor:
    """Squared euclidean distances of a chunk of queries to every key: (chunk, N), never (N, N).

    Squared distances rank neighbours exactly like euclidean ones (and like cosine on the unit
    sphere), so no sqrt is needed for retrieval.
    """
    q_sq = (queries * queries).sum(dim=1, keepdim=True)
    return (q_sq + keys_sq.unsqueeze(0) - 2.0 * queries @ keys.T).clamp_min_(0.0)


def _pessimistic_keys(dist: torch.Tensor, labels: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
    """Sort keys that rank by distance and, among equal distances, put other-label items first.

    Ties are broken against the model: a model that maps everything to one point scores 0, never 1.
    The bits of a non-negative float32 order like the floats, so (bits << 1) | same_label is exact.
    """
    dist = dist.to(torch.float32).add_(0.0).contiguous()  # -0.0 + 0.0 = +0.0: no negative bit patterns
    keys = dist.view(torch.int32).to(torch.int64).bitwise_left_shift_(1)
    return keys.bitwise_or_(labels.unsqueeze(0) == query_labels.unsqueeze(1))


def check_finite(embeddings: torch.Tensor, what: str = "the model") -> None:
    """NaN or infinite embeddings make every distance meaningless (NaN ranks first in a sort)."""
    bad = int((~torch.isfinite(embeddings)).any(dim=1).sum().item()) if embeddings.numel() else 0
    if bad:
        raise NonFiniteError(
            f"{what} gives non-finite embeddings (NaN or infinity) for {bad} of "
            f"{embeddings.shape[0]} rows: its weights are damaged or training diverged; "
            f"there is nothing meaningful to measure"
        )


def sample_triplets(labels: Any, num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uniformly sample `num` valid (anchor, positive, negative) index triplets, reproducibly.

    Anchors are drawn among rows that have at least one other row of their label and at least one
    row of another label; positive and negative are uniform among the valid partners. Vectorised
    (no per-triplet Python loop) so 10^5 triplets over 10^6 rows are cheap.
    """
    lab = np.asarray(torch.as_tensor(labels).cpu().numpy()).reshape(-1)
    n = lab.shape[0]
    order = np.argsort(lab, kind="stable")  # rows grouped by label
    sorted_lab = lab[order]
    uniq, start, count = np.unique(sorted_lab, return_index=True, return_counts=True)
    cls = np.searchsorted(uniq, lab)  # class index of each row
    rank_in_class = np.empty(n, dtype=np.int64)
    rank_in_class[order] = np.arange(n) - np.repeat(start, count)
    valid = (count[cls] >= 2) & (count[cls] < n)
    candidates = np.flatnonzero(valid)
    empty = np.zeros(0, dtype=np.int64)
    if candidates.size == 0 or num <= 0:
        return empty, empty, empty
    rng = np.random.default_rng(seed)
    a = candidates[rng.integers(0, candidates.size, size=num)]
    c = cls[a]
    # positive: a uniform other member of the class (skip the anchor's own slot)
    p_slot = (rng.random(num) * (count[c] - 1)).astype(np.int64)
    p_slot += p_slot >= rank_in_class[a]
    p = order[start[c] + p_slot]
    # negative: a uniform slot of the sorted order outside the class's block
    n_slot = (rng.random(num) * (n - count[c])).astype(np.int64)
    n_slot += np.where(n_slot >= start[c], count[c], 0)
    neg = order[n_slot]
    return a, p, neg


def triplet_accuracy(embeddings: Any, labels: Any, num: int = 10000, seed: int = 0) -> tuple[float, int]:
    """Fraction of sampled triplets with d(a,p) < d(a,n) (strict: ties, e.g. a collapsed model, fail)."""
    emb, lab = _as_tensor(embeddings, labels)
    a, p, n = sample_triplets(lab, num, seed)
    if a.size == 0:
        return float("nan"), 0
    a_t, p_t, n_t = (torch.as_tensor(x, device=emb.device) for x in (a, p, n))
    d_ap = ((emb[a_t] - emb[p_t]) ** 2).sum(dim=1)
    d_an = ((emb[a_t] - emb[n_t]) ** 2).sum(dim=1)
    return float((d_ap < d_an).double().mean().item()), int(a.size)


def given_triplet_accuracy(embeddings: Any, triplets: Sequence[tuple[int, int, int]]) -> tuple[float, int]:
    """Fraction of the data's own (anchor, positive, negative) triplets with d(a,p) < d(a,n), euclidean
    (strict, like `triplet_accuracy`). On unit-normalised embeddings this ranks like cosine, so it is
    the number sentence-transformers' TripletEvaluator reports for the same triplets."""
    emb = torch.as_tensor(embeddings).detach().to(torch.float32)
    if not len(triplets):
        return float("nan"), 0
    a, p, n = torch.as_tensor(triplets, dtype=torch.int64, device=emb.device).T
    d_ap = ((emb[a] - emb[p]) ** 2).sum(dim=1)
    d_an = ((emb[a] - emb[n]) ** 2).sum(dim=1)
    return float((d_ap < d_an).double().mean().item()), len(triplets)


def _per_query_values(rel: torch.Tensor, r: torch.Tensor, ks: Sequence[int]) -> dict[str, torch.Tensor]:
    """hit@k (1.0 or 0.0), AP@R and R-precision of each query of a chunk, from the relevance (float64,
    1.0 for a same-label row) of its k_chunk nearest rows in order and its R."""
    k_chunk = rel.shape[1]
    values = {f"recall@{k}": rel[:, : min(k, k_chunk)].amax(dim=1) for k in ks}
    positions = torch.arange(1, k_chunk + 1, device=rel.device, dtype=torch.float64)
    within_r = positions.unsqueeze(0) <= r.unsqueeze(1).to(torch.float64)
    rel_r = rel * within_r
    precision_at_i = rel_r.cumsum(dim=1) / positions
    r_f = r.to(torch.float64)
    values["map@r"] = (precision_at_i * rel_r).sum(dim=1) / r_f
    values["r_precision"] = rel_r.sum(dim=1) / r_f
    return values


def retrieval_metrics(
    embeddings: Any,
    labels: Any,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 1024,
    triplet_samples: int = 10000,
    seed: int = 0,
    per_query_out: dict[str, list[torch.Tensor]] | None = None,
) -> dict[str, float | int]:
    """recall@k, MAP@R, R-precision and triplet accuracy of an (N, D) embedding matrix.

    Neighbours exclude the query itself; distance is euclidean. Each chunk of queries asks topk for
    k = max(max(ks), largest R in the chunk) neighbours, which is what MAP@R needs even for a
    2-class set where R ~ N/2. Memory is O(chunk_size x N).
    Raises DataError when no label appears twice (no query has an answer).
    `per_query_out` receives each chunk's query rows and per-query values (see `per_query_metrics`).
    """
    emb, lab = _as_tensor(embeddings, labels)
    n = emb.shape[0]
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    chunk_size = max(1, int(chunk_size))
    check_finite(emb)

    uniq, inverse, counts = torch.unique(lab, return_inverse=True, return_counts=True)
    r_all = counts[inverse] - 1  # other same-label items per query
    queries = torch.nonzero(r_all > 0).flatten()
    excluded = n - queries.numel()
    if queries.numel() == 0:
        raise DataError(f"no label appears twice among {n} rows: retrieval metrics need at least two rows per label")

    # Distances do not change under a shift; with the first row at the origin, identical rows are
    # exactly 0 apart (the expanded form's rounding would otherwise order them at random).
    emb = emb - emb[:1]
    sums = _summed_per_query(emb, lab, queries, r_all, ks, chunk_size, per_query_out)
    q = queries.numel()
    out: dict[str, float | int] = {name: total / q for name, total in sums.items()}
    acc, used = triplet_accuracy(emb, lab, triplet_samples, seed)
    out["triplet_accuracy"] = acc
    out["rows"] = n
    out["classes"] = int(uniq.numel())
    out["queries"] = q
    out["excluded_queries"] = excluded
    out["triplets"] = used
    return out


def _summed_per_query(
    emb: torch.Tensor,
    lab: torch.Tensor,
    queries: torch.Tensor,
    r_all: torch.Tensor,
    ks: tuple[int, ...],
    chunk_size: int,
    per_query_out: dict[str, list[torch.Tensor]] | None,
) -> dict[str, float]:
    """Each per-query value summed over the queries, searched a chunk of queries at a time (memory
    O(chunk_size x N)); `per_query_out` receives each chunk's query rows and values."""
    n = emb.shape[0]
    keys_sq = (emb * emb).sum(dim=1)
    sums = {name: 0.0 for name in (*(f"recall@{k}" for k in ks), "map@r", "r_precision")}
    begin = 0
    while begin < queries.numel():
        idx = queries[begin : begin + chunk_size]
        k_chunk = min(n - 1, max(ks[-1], int(r_all[idx].max().item())))
        # MAP@R needs the top R of every query, and R can be N/2 (two classes): the (rows, k) float64
        # work tensors would then dwarf the (rows, N) distance block, so take fewer rows per chunk.
        rows = max(1, min(idx.numel(), chunk_size * n // (8 * k_chunk)))
        idx = idx[:rows]
        begin += rows
        r = r_all[idx]
        k_chunk = min(n - 1, max(ks[-1], int(r.max().item())))
        dist = _distance_block(emb[idx], emb, keys_sq)
        dist[torch.arange(idx.numel(), device=emb.device), idx] = float("inf")  # not itself
        nearest = torch.topk(_pessimistic_keys(dist, lab, lab[idx]), k_chunk, dim=1, largest=False, sorted=True).indices
        del dist
        rel = (lab[nearest] == lab[idx].unsqueeze(1)).to(torch.float64)  # (chunk, k_chunk)
        values = _per_query_values(rel, r, ks)
        for name in sums:
            sums[name] += float(values[name].sum().item())
        if per_query_out is not None:
            for name, tensor in {"query_rows": idx, **values}.items():
                per_query_out.setdefault(name, []).append(tensor.cpu())
    return sums


@dataclass(frozen=True)
class PerQueryMetrics:
    """The per-query values `retrieval_metrics` averages, for paired comparisons of two models on
    the same rows (evaluation/bootstrap.py): `values[name][i]` belongs to row `query_rows[i]`."""

    query_rows: np.ndarray  # int64, ascending: the rows whose label appears at least twice
    values: dict[str, np.ndarray]  # "recall@k" (hit 1.0 / miss 0.0), "map@r" (AP@R), "r_precision": float64
    rows: int
    classes: int
    excluded_queries: int

    def means(self) -> dict[str, float]:
        return {name: float(values.mean()) for name, values in self.values.items()}


def per_query_metrics(
    embeddings: Any, labels: Any, ks: Sequence[int] = DEFAULT_KS, chunk_size: int = 1024
) -> PerQueryMetrics:
    """Each query's hit@k, AP@R and R-precision, from the same search as `retrieval_metrics` (their
    means are its recall@k, MAP@R and R-precision, up to float rounding of the sum)."""
    out: dict[str, list[torch.Tensor]] = {}
    totals = retrieval_metrics(embeddings, labels, ks, chunk_size, triplet_samples=0, per_query_out=out)
    query_rows = torch.cat(out.pop("query_rows")).numpy().astype(np.int64)
    values = {name: torch.cat(parts).numpy().astype(np.float64) for name, parts in out.items()}
    return PerQueryMetrics(
        query_rows, values, int(totals["rows"]), int(totals["classes"]), int(totals["excluded_queries"])
    )


# --------------------------------------------------------------------------------------------
# a model on rows


def evaluate_model(
    model,
    tokenizer,
    rows,
    batch_size: int = 256,
    max_length: int = DEFAULT_MAX_LENGTH,
    device: str = "cpu",
    what: str = "the model",
) -> dict[str, float | int]:
    """Encode labelled rows with the model and score retrieval among them (leave-one-out)."""
    if len(rows.texts) < 2:
        raise DataError(f"need at least 2 rows to evaluate, got {len(rows.texts)}")
    if batch_size < 1:
        raise DataError(f"the encoding batch size must be at least 1, got {batch_size}")
    embeddings = encode(model, tokenizer, rows.texts, batch_size=batch_size, max_length=max_length, device=device)
    check_finite(embeddings, what)
    if torch.device(device).type == "cuda":  # the chunked search is matmul + topk: much faster there
        embeddings = embeddings.to(device)
    metrics = retrieval_metrics(embeddings, torch.as_tensor(rows.labels))
    triplets = getattr(rows, "triplets", None)
    if triplets:
        metrics["given_negative_accuracy"], metrics["given_triplets"] = given_triplet_accuracy(embeddings, triplets)
    metrics["skipped_rows"] = int(getattr(rows, "skipped", 0))
    return metrics
