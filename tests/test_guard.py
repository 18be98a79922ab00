"""The false-negative guard (`false_negative_guard: ρ`, tripletctl/train/guard.py) against brute-force
loops: every hard mode and InfoNCE, both distances, both fallbacks, with and without a memory, the
skipped count, and `mine_indices` picking only kept negatives."""

from __future__ import annotations

import pytest
import torch
from helpers import LABELS, TRIPLET_MODES, check_against_reference, cosine, text_like_embeddings

from tripletctl.config import choices
from tripletctl.train import guard
from tripletctl.train.mining import mine, mine_indices

STRUCTURES = ["four-classes", "uneven", "singletons", "two-classes"]


@pytest.mark.parametrize("rho", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("distance", choices.DISTANCES)
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("mode", TRIPLET_MODES)
def test_guarded_modes_match_the_reference(mode, structure, distance, rho):
    labels = LABELS[structure]()
    e = text_like_embeddings(len(labels), seed=11, spread=0.7)
    _, stats = check_against_reference(e, labels, mode, "margin", guard=rho, distance=distance)
    assert stats.guard_skipped > 0  # the guard did something on this data


@pytest.mark.parametrize("fallback", choices.FALLBACKS)
@pytest.mark.parametrize("loss", ["margin", "soft-margin"])
def test_guarded_semi_hard_fallbacks_and_soft_margin(fallback, loss):
    labels = LABELS["uneven"]()
    for seed in range(3):
        check_against_reference(
            text_like_embeddings(len(labels), seed=seed, spread=0.7),
            labels,
            "semi-hard",
            loss,
            guard=0.8,
            fallback=fallback,
        )
    check_against_reference(
        text_like_embeddings(len(labels), seed=4, spread=0.7), labels, "batch-hard", loss, guard=0.8, fallback=fallback
    )


@pytest.mark.parametrize("rho", [0.5, 0.9])
@pytest.mark.parametrize("structure", [*STRUCTURES, "all-distinct"])
def test_guarded_infonce_matches_the_reference(structure, rho):
    labels = LABELS[structure]()
    check_against_reference(
        text_like_embeddings(len(labels), seed=5, spread=0.7), labels, "batch-all", "infonce", guard=rho
    )


@pytest.mark.parametrize("mode", [*TRIPLET_MODES, "infonce"])
def test_the_guard_covers_memory_rows(mode):
    labels = LABELS["four-classes"]()
    memory = (text_like_embeddings(12, seed=9, spread=0.7), torch.tensor([0, 1, 2, 3, 0, 1, 5, 6, 7, 8, 9, 9]))
    loss, mode = ("infonce", "batch-all") if mode == "infonce" else ("margin", mode)
    _, stats = check_against_reference(
        text_like_embeddings(16, seed=8, spread=0.7), labels, mode, loss, memory=memory, guard=0.9
    )
    without_memory = check_against_reference(
        text_like_embeddings(16, seed=8, spread=0.7), labels, mode, loss, guard=0.9
    )[1]
    assert stats.guard_skipped > without_memory.guard_skipped


@pytest.mark.parametrize("mode", ["semi-hard", "hard-negative", "batch-hard"])
def test_mine_indices_keep_only_kept_negatives(mode):
    """Every mined negative passes the guard, and mine_indices picks what mine scores."""
    labels = LABELS["uneven"]()
    e, rho = text_like_embeddings(len(labels), seed=2, spread=0.7), 0.9
    a, p, n = mine_indices(e, labels, mode, guard=rho)
    assert len(a) > 0
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()):
        assert labels[i] == labels[j] != labels[k]
        assert not cosine(e[i], e[k]).item() > rho * cosine(e[i], e[j]).item()
    d = torch.cdist(e, e)
    expected = torch.relu(d[a, p] - d[a, n] + 0.2).mean()
    assert mine(e, labels, mode, 0.2, guard=rho)[0].item() == pytest.approx(expected.item(), abs=1e-6)


def test_every_negative_skipped_is_a_connected_zero():
    """On embeddings all alike (an untrained model) a strict guard leaves nothing: loss 0, graph kept."""
    e = torch.nn.functional.normalize(torch.ones(8, 4) + 0.01 * torch.randn(8, 4), dim=1).requires_grad_(True)
    labels = torch.arange(8) // 2
    for mode, loss in [(m, "margin") for m in TRIPLET_MODES] + [("batch-all", "infonce")]:
        value, stats = mine(e, labels, mode, 0.2, loss=loss, guard=0.5)
        assert value.item() == 0.0 and stats.num_triplets == 0 and stats.guard_skipped > 0
        value.backward()


def test_distance_limit_is_the_cosine_rule():
    """d(a,n) < limit(d(a,p)) ⇔ cos(a,n) > ρ·cos(a,p) on unit vectors, for both distances."""
    e = text_like_embeddings(40, seed=1, spread=0.5)
    cos = e @ e.T
    sq = torch.cdist(e, e) ** 2
    for rho in (0.3, 0.95, 1.0):
        for distance, d in (("euclidean", sq.sqrt()), ("squared-euclidean", sq)):
            limit = guard.distance_limit(d[0, 1:2], rho, distance)
            by_distance = d[0, 2:] < limit
            by_cosine = cos[0, 2:] > rho * cos[0, 1]
            assert torch.equal(by_distance, by_cosine)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        guard.distance_limit(d[0, :1], 1.5, "euclidean")
