"""Retrieval metrics against brute force and pytorch-metric-learning, the chunked search, given
triplets (`tripletctl eval` is test_eval_command.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tripletctl.core.errors import DataError, NonFiniteError
from tripletctl.evaluation import retrieval as evaluation
from tripletctl.evaluation.retrieval import retrieval_metrics, sample_triplets, triplet_accuracy


def brute_force(emb: np.ndarray, labels: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Straight from the definitions: a full N x N distance matrix and Python loops."""
    n = len(labels)
    d = ((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1)
    out = {f"recall@{k}": 0.0 for k in ks}
    out["map@r"] = 0.0
    out["r_precision"] = 0.0
    q = 0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        r = sum(labels[j] == labels[i] for j in others)
        if r == 0:
            continue
        q += 1
        # ties broken against the model: other-label items first among equal distances
        ranked = sorted(others, key=lambda j: (d[i, j], labels[j] == labels[i], j))
        rel = [labels[j] == labels[i] for j in ranked]
        for k in ks:
            out[f"recall@{k}"] += any(rel[:k])
        out["r_precision"] += sum(rel[:r]) / r
        ap = 0.0
        for pos in range(1, r + 1):
            if rel[pos - 1]:
                ap += sum(rel[:pos]) / pos
        out["map@r"] += ap / r
    return {k: v / q for k, v in out.items()} | {"queries": q}


def random_set(n: int, d: int, classes: int, seed: int, noise: float = 1.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centres = rng.normal(size=(classes, d))
    emb = centres[labels] + noise * rng.normal(size=(n, d))
    return emb.astype(np.float32), labels


@pytest.mark.parametrize("n,d,classes,seed", [(40, 4, 3, 0), (60, 8, 2, 1), (75, 3, 12, 2), (30, 5, 25, 3)])
def test_metrics_match_brute_force(n, d, classes, seed):
    emb, labels = random_set(n, d, classes, seed)
    got = retrieval_metrics(emb, labels, chunk_size=16)
    want = brute_force(emb.astype(np.float64), labels)
    for key in ("recall@1", "recall@5", "recall@10", "map@r", "r_precision"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert got["queries"] == want["queries"]
    assert got["excluded_queries"] == n - want["queries"]


def test_hand_computed_tiny_case():
    # 1-D points: A at 0, 1, 10; B at 2.5, 11 (no distance ties).
    emb = np.array([[0.0], [1.0], [10.0], [2.5], [11.0]], dtype=np.float32)
    labels = np.array([0, 0, 0, 1, 1])
    m = retrieval_metrics(emb, labels, ks=(1, 2))
    # query (R): ranked relevance -> AP@R, R-precision, r@1, r@2
    # 0 (R=2): 1 A, 2.5 B, 10 A, 11 B   -> (1/1)/2 = .5, 1/2, 1, 1
    # 1 (R=2): 0 A, 2.5 B, 10 A, 11 B   -> .5, .5, 1, 1
    # 2 (R=2): 11 B, 2.5 B, 1 A, 0 A    -> 0, 0, 0, 0
    # 3 (R=1): 1 A, 0 A, 10 A, 11 B     -> 0, 0, 0, 0
    # 4 (R=1): 10 A, 2.5 B, 1 A, 0 A    -> 0, 0, 0, 1
    assert m["recall@1"] == pytest.approx(2 / 5)
    assert m["recall@2"] == pytest.approx(3 / 5)
    assert m["map@r"] == pytest.approx((0.5 + 0.5) / 5)
    assert m["r_precision"] == pytest.approx((0.5 + 0.5) / 5)


def test_perfect_and_unique_labels():
    emb = np.array([[0.0, 0.0], [0.0, 0.1], [5.0, 5.0], [5.0, 5.1], [9.0, -9.0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 2])  # label 2 appears once: excluded, counted
    m = retrieval_metrics(emb, labels)
    assert m["recall@1"] == m["map@r"] == m["r_precision"] == 1.0
    assert m["excluded_queries"] == 1 and m["queries"] == 4 and m["classes"] == 3
    assert m["triplet_accuracy"] == 1.0
    with pytest.raises(DataError, match="no label appears twice"):
        retrieval_metrics(emb[:3:2], labels[:3:2])


def test_collapsed_embeddings_score_zero_triplet_accuracy():
    emb = np.ones((20, 4), dtype=np.float32)
    labels = np.arange(20) % 4
    m = retrieval_metrics(emb, labels)
    assert m["triplet_accuracy"] == 0.0  # ties fail: d(a,p) < d(a,n) is strict


def test_chunk_sizes_agree_and_never_build_n_by_n(monkeypatch):
    emb, labels = random_set(53, 6, 4, 7)
    shapes: list[tuple[int, int]] = []
    real = evaluation._distance_block

    def spy(q, k, ksq):
        out = real(q, k, ksq)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(evaluation, "_distance_block", spy)
    results = [retrieval_metrics(emb, labels, chunk_size=c) for c in (1, 7, 53, 1000)]
    for other in results[1:]:
        assert other == pytest.approx(results[0])
    shapes.clear()
    retrieval_metrics(emb, labels, chunk_size=7)
    assert shapes and all(rows <= 7 and cols == 53 for rows, cols in shapes)


def test_two_classes_need_top_r_not_top_10():
    # R ~ N/2 = 59: MAP@R must look far past the 10 nearest
    emb, labels = random_set(120, 3, 2, 11, noise=2.0)
    got = retrieval_metrics(emb, labels, chunk_size=32)
    want = brute_force(emb.astype(np.float64), labels)
    assert got["map@r"] == pytest.approx(want["map@r"], abs=1e-9)
    assert got["r_precision"] == pytest.approx(want["r_precision"], abs=1e-9)


def test_sampled_triplets_are_valid_uniform_and_seeded():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 1 + [3] * 7)
    a, p, n = sample_triplets(labels, 20000, seed=3)
    assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
    assert not (labels[a] == 2).any()  # no positive exists for the singleton
    a2, p2, n2 = sample_triplets(labels, 20000, seed=3)
    assert (a == a2).all() and (p == p2).all() and (n == n2).all()
    # negatives of class-3 anchors are uniform over the 9 other rows
    counts = np.bincount(n[labels[a] == 3], minlength=len(labels))[:9]
    assert counts.min() > 0.8 * counts.mean()


def test_triplet_accuracy_matches_exhaustive_fraction():
    emb, labels = random_set(24, 2, 3, 5, noise=1.5)
    d = ((emb[:, None] - emb[None]) ** 2).sum(-1)
    # anchors are drawn uniformly (then partners uniformly), so the expectation is a mean per anchor
    per_anchor = []
    for a in range(24):
        pos = [p for p in range(24) if p != a and labels[p] == labels[a]]
        neg = [n for n in range(24) if labels[n] != labels[a]]
        per_anchor.append(np.mean([d[a, p] < d[a, n] for p in pos for n in neg]))
    acc, used = triplet_accuracy(emb, labels, num=40000, seed=0)
    assert used == 40000
    assert acc == pytest.approx(float(np.mean(per_anchor)), abs=0.01)


def test_accepts_torch_input():
    emb, labels = random_set(30, 4, 3, 9)
    assert retrieval_metrics(torch.tensor(emb), torch.tensor(labels)) == pytest.approx(retrieval_metrics(emb, labels))


# ------------------------------------------------------------------------------------ given triplets


def test_given_triplet_accuracy_matches_a_loop():
    emb, _ = random_set(30, 5, 3, 11)
    rng = np.random.default_rng(0)
    triplets = [tuple(int(x) for x in rng.choice(30, 3, replace=False)) for _ in range(200)]
    triplets.append((0, 1, 1))  # a tie fails (strict), like a collapsed model
    expected = np.mean([np.linalg.norm(emb[a] - emb[p]) < np.linalg.norm(emb[a] - emb[n]) for a, p, n in triplets])
    acc, used = evaluation.given_triplet_accuracy(torch.tensor(emb), triplets)
    assert used == 201 and acc == pytest.approx(float(expected), abs=1e-12)
    assert np.isnan(evaluation.given_triplet_accuracy(torch.tensor(emb), [])[0])


def test_a_one_point_model_never_scores_well():
    # every embedding identical: all distances tie, and ties are broken against the model
    labels = np.arange(40) % 5
    for point in (np.ones(8), np.random.default_rng(0).normal(size=8)):
        emb = np.tile(point.astype(np.float32), (40, 1))
        m = retrieval_metrics(emb, labels)
        assert m["recall@1"] == m["recall@5"] == m["recall@10"] == 0.0
        assert m["map@r"] == m["r_precision"] == m["triplet_accuracy"] == 0.0
        want = brute_force(emb.astype(np.float64), labels)
        assert {k: m[k] for k in want if k != "queries"} == pytest.approx(
            {k: v for k, v in want.items() if k != "queries"}
        )


def test_partial_ties_are_broken_pessimistically_like_the_reference():
    # two points only: half the rows at each, labels mixed, so every query has same- and other-label ties
    rng = np.random.default_rng(3)
    emb = np.repeat(np.array([[0.0, 0.0], [1.0, 0.0]], dtype=np.float32), 30, axis=0)
    labels = rng.integers(0, 3, size=60)
    got = retrieval_metrics(emb, labels, chunk_size=7)
    want = brute_force(emb.astype(np.float64), labels)
    for key in ("recall@1", "recall@5", "recall@10", "map@r", "r_precision"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_are_refused(bad):
    emb, labels = random_set(30, 4, 3, 1)
    emb[7, 2] = bad
    with pytest.raises(NonFiniteError, match="non-finite embeddings .* for 1 of 30 rows"):
        retrieval_metrics(emb, labels)


# ------------------------------------------------------------------------------------ cross-checks


@pytest.mark.parametrize(
    "n,d,classes,seed", [(40, 4, 3, 0), (60, 8, 2, 1), (75, 3, 12, 2), (30, 5, 25, 3), (500, 16, 40, 4)]
)
def test_metrics_match_pytorch_metric_learning(n, d, classes, seed):
    """recall@1, MAP@R and R-precision against pytorch-metric-learning's AccuracyCalculator (the `test`
    extra): leave-one-out over one set, euclidean, queries with a unique label left out by both."""
    accuracy = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.inference import CustomKNN

    emb, labels = random_set(n, d, classes, seed)
    calculator = accuracy.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        knn_func=CustomKNN(LpDistance(normalize_embeddings=False)),
        device=torch.device("cpu"),
    )
    theirs = calculator.get_accuracy(torch.tensor(emb), torch.tensor(labels))
    ours = retrieval_metrics(emb, labels, chunk_size=16)
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
