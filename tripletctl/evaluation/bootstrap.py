"""Paired bootstrap intervals for the difference between two models scored on the same queries.

Pure numpy, no torch: `tripletctl compare` and benchmark scripts call it on per-query values
(`retrieval.per_query_metrics`). The queries are resampled with replacement and the *same* resample
is applied to both models and to every metric, so what varies between two models on a query is
compared query by query (Efron & Tibshirani 1993, ch. 13; the percentile interval).

Reproducibility contract: resample r (r = 0, 1, ...) is the r-th draw of
`rng.integers(0, n, size=n)` from `rng = np.random.default_rng(seed)`. Resamples are drawn in
blocks of rows (`rng.integers(0, n, size=(rows, n))` draws the same numbers as `rows` separate
draws), so memory stays bounded by `block_values` indices whatever n x resamples is, and the
result does not depend on the block size.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95
BLOCK_VALUES = 1 << 22  # indices per block: 32 MB of int64, and as much again for one gathered metric


def _paired_arrays(
    per_query_a: Mapping[str, np.ndarray], per_query_b: Mapping[str, np.ndarray]
) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Both sides as float64 1-D arrays of one length over the same metric names, or ValueError."""
    names = list(per_query_a)
    if set(names) != set(per_query_b):
        raise ValueError(f"the two sides name different metrics: {sorted(per_query_a)} and {sorted(per_query_b)}")
    if not names:
        raise ValueError("no metric to compare")
    a = {name: np.asarray(per_query_a[name], dtype=np.float64) for name in names}
    b = {name: np.asarray(per_query_b[name], dtype=np.float64) for name in names}
    lengths = {values.shape for values in (*a.values(), *b.values())}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise ValueError(f"per-query values must be 1-D arrays of one length (the same queries), got shapes {lengths}")
    if next(iter(lengths))[0] == 0:
        raise ValueError("no queries to resample")
    for side, values in (("A", a), ("B", b)):
        for name, array in values.items():
            if not np.isfinite(array).all():
                raise ValueError(f"{side}'s per-query {name} holds NaN or infinity")
    return names, a, b


def resampled_mean_differences(
    differences: Mapping[str, np.ndarray], resamples: int, seed: int, block_values: int = BLOCK_VALUES
) -> dict[str, np.ndarray]:
    """The mean of each per-query difference array over every resample (shape (resamples,) each),
    with one set of resample indices shared by all arrays (see the module's contract)."""
    names = list(differences)
    n = len(differences[names[0]])
    rng = np.random.default_rng(seed)
    out = {name: np.empty(resamples, dtype=np.float64) for name in names}
    rows = max(1, min(resamples, block_values // n))
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        indices = rng.integers(0, n, size=(stop - start, n))
        for name in names:
            out[name][start:stop] = differences[name][indices].mean(axis=1)
    return out


def better_side(low: float, high: float) -> str | None:
    """The side an interval of B - A favours: "b" when it lies above 0, "a" below, None when it holds 0."""
    if low > 0:
        return "b"
    if high < 0:
        return "a"
    return None


def paired_bootstrap(
    per_query_a: Mapping[str, np.ndarray],
    per_query_b: Mapping[str, np.ndarray],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    block_values: int = BLOCK_VALUES,
) -> dict[str, dict[str, float | str | None]]:
    """For each metric: A's and B's means over the queries, diff = B - A, and the paired bootstrap
    percentile interval [low, high] of diff at `confidence`; `better` is "a", "b" or None (the
    interval spans 0: no detectable difference). Position i of every array is the same query."""
    if int(resamples) < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    names, a, b = _paired_arrays(per_query_a, per_query_b)
    differences = {name: b[name] - a[name] for name in names}
    means = resampled_mean_differences(differences, int(resamples), seed, block_values)
    tail = (1.0 - confidence) / 2.0
    result: dict[str, dict[str, float | str | None]] = {}
    for name in names:
        low, high = (float(x) for x in np.quantile(means[name], [tail, 1.0 - tail]))
        result[name] = {
            "a": float(a[name].mean()),
            "b": float(b[name].mean()),
            "diff": float(differences[name].mean()),
            "low": low,
            "high": high,
            "better": better_side(low, high),
        }
    return result
