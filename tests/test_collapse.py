"""Collapse statistics, verdicts on known cases and the live watchdog (`inspect-collapse` is
test_collapse_command.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_collapsed, tiny_encoder

from tripletctl.evaluation.collapse import AT_RISK, COLLAPSED, EXIT_CODES, HEALTHY, collapse_report, effective_rank
from tripletctl.train.watchdog import CollapseWatchdog

HELDOUT = Path(__file__).resolve().parent.parent / "curricula" / "quickstart" / "heldout.jsonl"


def clusters(classes: int = 12, per_class: int = 8, dim: int = 32, noise: float = 0.03, seed: int = 0):
    """Tight clusters around random directions, on the unit sphere: the healthy reference."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    emb = torch.nn.functional.normalize(centres[labels] + noise * torch.randn(len(labels), dim, generator=g), dim=1)
    return emb, labels


def heldout_sample(n: int = 96) -> tuple[list[str], torch.Tensor]:
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines()[:n]]
    names = sorted({r["label"] for r in rows})
    return [r["text"] for r in rows], torch.tensor([names.index(r["label"]) for r in rows])


# ------------------------------------------------------------------------------------ statistics


def test_healthy_clusters():
    emb, labels = clusters()
    report = collapse_report(emb, labels, margin=0.2)
    assert report.verdict == HEALTHY and report.exit_code == 0, report.reasons
    assert abs(report.mean_cosine) < 0.2
    assert report.effective_rank > 8
    assert report.separation > 0.5 and report.near_margin_fraction == 0.0
    assert report.batch_hard_loss == 0.0  # every hardest negative beyond hardest positive + margin
    assert report.uniformity < -2 and report.alignment < 0.1


def test_single_point_is_collapsed():
    emb = torch.nn.functional.normalize(torch.ones(40, 16), dim=1)
    labels = torch.arange(40) % 5
    report = collapse_report(emb, labels, margin=0.2)
    assert report.verdict == COLLAPSED and report.exit_code == 3
    assert report.mean_cosine == pytest.approx(1.0)
    assert report.effective_rank == 0.0 and report.embedding_spread == pytest.approx(0.0, abs=1e-7)
    assert report.batch_hard_loss == pytest.approx(0.2) and report.near_margin_fraction == 1.0
    assert report.uniformity == pytest.approx(0.0, abs=1e-9) and report.alignment == pytest.approx(0.0, abs=1e-9)
    assert len(report.reasons) >= 3


def test_narrow_cone_is_at_risk():
    emb, labels = clusters(noise=0.03)
    cone = torch.nn.functional.normalize(
        emb * 0.3 + torch.nn.functional.normalize(torch.ones(emb.shape[1]), dim=0) * 1.0, dim=1
    )
    report = collapse_report(cone, labels, margin=0.2)
    assert 0.9 < report.mean_cosine < 0.99
    assert report.verdict == AT_RISK and report.exit_code == 1
    assert any("narrow cone" in r for r in report.reasons)


def test_line_with_many_classes_is_collapsed_but_two_classes_on_a_line_are_not():
    t = torch.linspace(-1, 1, 60).unsqueeze(1)
    line = torch.cat([t, torch.zeros(60, 7)], dim=1) + torch.tensor([0.0, 3.0] + [0.0] * 6)
    many = collapse_report(line, torch.arange(60) % 6)
    assert many.effective_rank < 1.5 and many.verdict == COLLAPSED
    # two well separated groups on a line are a perfectly good 2-class embedding
    two = torch.cat([torch.zeros(30, 4), torch.ones(30, 4)]) + 0.01 * torch.randn(
        60, 4, generator=torch.Generator().manual_seed(1)
    )
    report = collapse_report(two, torch.tensor([0] * 30 + [1] * 30))
    assert report.verdict == HEALTHY, report.reasons


def test_effective_rank_definition():
    s = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert effective_rank(s, 10.0) == pytest.approx(4.0)
    assert effective_rank(torch.tensor([3.0, 0.0]), 10.0) == pytest.approx(1.0)
    assert effective_rank(torch.tensor([1e-9, 1e-9]), 10.0) == 0.0  # rounding noise is not a direction


def test_alignment_uniformity_and_quantiles_match_brute_force():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(30, 5))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, 4, size=30)
    report = collapse_report(emb, labels, margin=0.3, distance="squared-euclidean")
    pos, allp, neg = [], [], []
    for i in range(30):
        for j in range(i + 1, 30):
            d2 = float(((emb[i] - emb[j]) ** 2).sum())
            allp.append(d2)
            (pos if labels[i] == labels[j] else neg).append(d2)
    assert report.alignment == pytest.approx(np.mean(pos))
    assert report.uniformity == pytest.approx(math.log(np.mean(np.exp(-2 * np.array(allp)))))
    assert report.ap_quantiles["p50"] == pytest.approx(np.median(pos))
    assert report.an_quantiles["p95"] == pytest.approx(np.quantile(neg, 0.95))
    cos = emb @ emb.T
    off = cos[~np.eye(30, dtype=bool)]
    assert report.mean_cosine == pytest.approx(off.mean()) and report.std_cosine == pytest.approx(off.std(ddof=1))
    assert sum(report.ap_hist) == len(pos) and sum(report.an_hist) == len(neg)
    # batch-hard by hand
    d = ((emb[:, None] - emb[None]) ** 2).sum(-1)
    losses = []
    for a in range(30):
        p = [d[a, j] for j in range(30) if j != a and labels[j] == labels[a]]
        n = [d[a, j] for j in range(30) if labels[j] != labels[a]]
        if p and n:
            losses.append(max(0.0, max(p) - min(n) + 0.3))
    assert report.batch_hard_loss == pytest.approx(np.mean(losses))


def test_report_json_is_plain_and_finite():
    emb, labels = clusters()
    payload = collapse_report(emb, labels).to_dict()
    text = json.dumps(payload, allow_nan=False)
    assert "d_ap" not in payload and payload["exit_code"] == 0 and payload["verdict"] == HEALTHY
    assert len(payload["singular_values"]) == emb.shape[1] and json.loads(text)["rows"] == len(labels)


def test_large_samples_are_subsampled():
    emb, labels = clusters(classes=10, per_class=60)
    report = collapse_report(emb, labels, max_rows=200)
    assert report.rows == 200 and report.verdict == HEALTHY


# ------------------------------------------------------------------------------- real encoders


def test_constant_head_encoder_is_collapsed(tiny_bert_dir):
    from tripletctl.model.encoder import encode

    model, tokenizer = tiny_encoder(tiny_bert_dir)
    make_collapsed(model)
    texts, labels = heldout_sample()
    report = collapse_report(encode(model, tokenizer, texts, max_length=32), labels)
    assert report.verdict == COLLAPSED and report.exit_code == EXIT_CODES[COLLAPSED] == 3
    assert report.near_margin_fraction == 1.0 and report.effective_rank == 0.0


@pytest.mark.slow
def test_untrained_encoder_is_reported_honestly(tiny_bert_dir):
    """Random tiny BERT: whatever the verdict, the numbers must be finite (docs/collapse.md says what it gives)."""
    from tripletctl.model.encoder import encode

    model, tokenizer = tiny_encoder(tiny_bert_dir)
    texts, labels = heldout_sample()
    report = collapse_report(encode(model, tokenizer, texts, max_length=32), labels)
    assert report.verdict in (HEALTHY, AT_RISK, COLLAPSED)
    numbers = [
        report.mean_cosine,
        report.std_cosine,
        report.embedding_spread,
        report.effective_rank,
        report.alignment,
        report.uniformity,
        report.batch_hard_loss,
        report.near_margin_fraction,
        report.separation,
        report.dim_std_min,
    ]
    assert all(math.isfinite(x) for x in numbers)


# ------------------------------------------------------------------------------------ watchdog


def test_watchdog_fires_after_exactly_patience_steps():
    dog = CollapseWatchdog(patience=3, tolerance=0.01)
    stuck = (0.2005, 0.2, 0.01)  # loss within 1% of margin, no spread
    assert [dog.update(*stuck) for _ in range(7)] == [False, False, True, False, False, True, False]
    assert dog.detections == 2  # still collapsed after another `patience` steps: reported again


def test_watchdog_resets_on_a_healthy_step():
    dog = CollapseWatchdog(patience=3, tolerance=0.01)
    dog.update(0.2, 0.2, 0.0)
    dog.update(0.2, 0.2, 0.0)
    assert dog.update(0.35, 0.2, 0.0) is False  # loss away from the margin: healthy
    assert dog.update(0.2, 0.2, 0.0) is False and dog.update(0.2, 0.2, 0.0) is False
    assert dog.update(0.2, 0.2, 0.5) is False  # loss at the margin but embeddings spread: a hard batch
    assert dog.streak == 0
    assert [dog.update(0.2, 0.2, 0.0) for _ in range(3)] == [False, False, True]
    dog.reset()
    assert dog.streak == 0
    assert [dog.update(0.2, 0.2, 0.0) for _ in range(3)] == [False, False, True]


def test_watchdog_ignores_non_finite_and_validates():
    dog = CollapseWatchdog(patience=1, tolerance=0.01)
    assert dog.update(float("nan"), 0.2, 0.0) is False
    assert dog.update(0.2, 0.2, float("nan")) is False
    assert dog.update(0.199, 0.2, 0.0) is True
    with pytest.raises(ValueError):
        CollapseWatchdog(patience=0, tolerance=0.01)


def test_watchdog_state_round_trips():
    dog = CollapseWatchdog(patience=4, tolerance=0.05, spread_threshold=0.1)
    for _ in range(3):
        dog.update(0.2, 0.2, 0.0)
    state = json.loads(json.dumps(dog.state_dict()))  # as a checkpoint would store it
    resumed = CollapseWatchdog(patience=4, tolerance=0.05, spread_threshold=0.1)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == dog.state_dict()
    assert resumed.update(0.2, 0.2, 0.0) is True  # the 4th consecutive step, across the resume


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_are_refused_not_a_linalg_error(bad):
    from tripletctl.core.errors import NonFiniteError

    emb = torch.randn(20, 6)
    emb[3, 1] = bad
    with pytest.raises(NonFiniteError, match="non-finite embeddings"):
        collapse_report(emb, torch.arange(20) % 4)


def test_svd_that_does_not_converge_falls_back_to_the_gram_matrix(monkeypatch):
    emb = torch.randn(30, 5, dtype=torch.float64)
    want = collapse_report(emb, torch.arange(30) % 3).singular_values

    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svdvals", fail)
    got = collapse_report(emb, torch.arange(30) % 3).singular_values
    assert np.allclose(got, want, rtol=1e-4, atol=1e-5)
