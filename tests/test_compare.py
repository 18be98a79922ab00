"""Per-query retrieval metrics against a brute-force reference, and the paired comparison of two
models' per-query values (`tripletctl compare` end to end is test_compare_command.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tripletctl.core.errors import DataError
from tripletctl.evaluation.compare import compare_per_query
from tripletctl.evaluation.retrieval import per_query_metrics, retrieval_metrics

METRICS = ("recall@1", "recall@5", "recall@10", "map@r", "r_precision")


def brute_force_per_query(emb: np.ndarray, labels: np.ndarray) -> tuple[list[int], dict[str, list[float]]]:
    """Each query's values straight from the definitions: an N x N matrix, Python loops, ties
    broken against the model (other-label rows first among equal distances)."""
    n = len(labels)
    d = ((emb[:, None, :].astype(np.float64) - emb[None, :, :]) ** 2).sum(-1)
    rows, out = [], {name: [] for name in METRICS}
    for i in range(n):
        others = [j for j in range(n) if j != i]
        r = sum(labels[j] == labels[i] for j in others)
        if r == 0:
            continue
        rows.append(i)
        ranked = sorted(others, key=lambda j: (d[i, j], labels[j] == labels[i], j))
        rel = [bool(labels[j] == labels[i]) for j in ranked]
        for k in (1, 5, 10):
            out[f"recall@{k}"].append(float(any(rel[:k])))
        out["r_precision"].append(sum(rel[:r]) / r)
        out["map@r"].append(sum(sum(rel[:pos]) / pos for pos in range(1, r + 1) if rel[pos - 1]) / r)
    return rows, out


def labelled_set(n: int, classes: int, seed: int, noise: float, dim: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centres = rng.normal(size=(classes, dim))
    return (centres[labels] + noise * rng.normal(size=(n, dim))).astype(np.float32), labels


@pytest.mark.parametrize("n,classes,seed,chunk", [(45, 4, 0, 8), (60, 2, 1, 7), (70, 30, 2, 1024), (33, 9, 3, 1)])
def test_per_query_values_match_brute_force_and_average_to_retrieval_metrics(n, classes, seed, chunk):
    emb, labels = labelled_set(n, classes, seed, noise=1.0)
    got = per_query_metrics(emb, labels, chunk_size=chunk)
    rows, want = brute_force_per_query(emb, labels)
    np.testing.assert_array_equal(got.query_rows, rows)
    for name in METRICS:
        np.testing.assert_allclose(got.values[name], want[name], rtol=0, atol=1e-12, err_msg=name)
    averaged = retrieval_metrics(emb, labels, chunk_size=chunk)
    assert got.rows == n and got.excluded_queries == averaged["excluded_queries"] and got.classes == averaged["classes"]
    for name in METRICS:
        assert got.means()[name] == pytest.approx(averaged[name], abs=1e-12), name
    for k in (1, 5, 10):  # hits are 0/1: their means are the same counts over the same queries
        assert got.means()[f"recall@{k}"] == averaged[f"recall@{k}"]


def test_per_query_ties_are_broken_against_the_model():
    rng = np.random.default_rng(3)
    emb = np.repeat(np.array([[0.0, 0.0], [1.0, 0.0]], dtype=np.float32), 20, axis=0)
    labels = rng.integers(0, 3, size=40)
    got = per_query_metrics(emb, labels, chunk_size=6)
    _, want = brute_force_per_query(emb, labels)
    for name in METRICS:
        np.testing.assert_allclose(got.values[name], want[name], rtol=0, atol=1e-12, err_msg=name)


def test_separated_embeddings_beat_noisy_ones_and_a_model_ties_itself():
    clean, labels = labelled_set(300, 20, 5, noise=0.3)
    rng = np.random.default_rng(6)
    noisy = clean + 1.5 * rng.normal(size=clean.shape).astype(np.float32)
    good, bad = per_query_metrics(clean, labels), per_query_metrics(noisy, labels)
    result = compare_per_query(bad, good, resamples=1000, seed=0)
    assert list(result) == list(METRICS)
    for name, entry in result.items():
        assert entry["low"] > 0 and entry["better"] == "b" and entry["verdict"] == "B is better", name
    itself = compare_per_query(good, per_query_metrics(clean.copy(), labels), resamples=1000, seed=0)
    for name, entry in itself.items():
        assert entry["diff"] == entry["low"] == entry["high"] == 0.0, name
        assert entry["verdict"] == "no detectable difference"


def test_different_rows_are_refused():
    emb, labels = labelled_set(50, 5, 0, noise=1.0)
    full, part = per_query_metrics(emb, labels), per_query_metrics(emb[:40], labels[:40])
    with pytest.raises(DataError, match="different rows"):
        compare_per_query(full, part)
