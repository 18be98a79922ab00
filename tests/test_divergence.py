"""The divergence detector (train/divergence.py) against a brute-force reference: the median of the
last WINDOW sane values, recomputed from scratch at every step."""

from __future__ import annotations

import random
import statistics

import pytest
import torch

from tripletctl.train.divergence import WARMUP_STEPS, WINDOW, DivergenceDetector, weight_norm


def test_nothing_is_checked_during_the_warm_up_and_the_factor_is_strict():
    detector = DivergenceDetector(100.0, loss_floor=0.2)
    for _ in range(WARMUP_STEPS - 1):
        assert detector.step_jump(1e9, 1e9) is None  # too early to know what normal is
        detector.observe(1.0, 1.0, None)
    detector.observe(1.0, 1.0, None)
    assert detector.step_jump(100.0, 100.0) is None  # exactly the factor: not beyond it
    assert "loss 100.1 is more than train.divergence_factor (100)" in detector.step_jump(100.1, 1.0)
    assert "gradient norm 101 is more than" in detector.step_jump(1.0, 101.0)


def test_a_loss_is_compared_with_at_least_the_margin_and_zero_gradients_are_no_yardstick():
    detector = DivergenceDetector(100.0, loss_floor=0.2)
    for i in range(WARMUP_STEPS):
        detector.observe(1e-4, 0.0 if i % 2 else 0.01, None)  # a converged phase: most triplets inactive
    assert detector.step_jump(0.5, 0.5) is None  # 5000x the median loss, but only 2.5x the margin
    assert detector.step_jump(20.5, 0.5) is not None
    assert detector.step_jump(0.5, 1.01) is not None  # the median of the moving gradients is 0.01


def test_the_weights_are_compared_from_the_first_step():
    detector = DivergenceDetector(100.0, loss_floor=0.2, weights=19.6)
    assert detector.weights_jump(1960.0) is None
    assert "weight norm 2.828e+08 is more than" in detector.weights_jump(2.828e8)


def test_null_turns_every_check_off():
    detector = DivergenceDetector(None, loss_floor=0.2, weights=1.0)
    for _ in range(WARMUP_STEPS):
        detector.observe(1.0, 1.0, 1.0)
    assert not detector.enabled
    assert detector.step_jump(1e30, 1e30) is None and detector.weights_jump(1e30) is None


@pytest.mark.parametrize("seed", range(5))
def test_decisions_match_a_brute_force_median_of_the_recent_sane_steps(seed):
    rng = random.Random(seed)
    factor, floor = 20.0, 0.05
    detector = DivergenceDetector(factor, loss_floor=floor, weights=10.0)
    sane_losses, sane_grads, sane_weights = [], [], [10.0]
    fired = 0
    for _ in range(400):
        spike = rng.random() < 0.05
        loss = rng.lognormvariate(-1, 1) * (1000 if spike and rng.random() < 0.5 else 1)
        grad = rng.choice([0.0, rng.lognormvariate(0, 1)]) * (1000 if spike else 1)
        weights = sane_weights[-1] * (1 + rng.uniform(-0.01, 0.01)) * (50 if rng.random() < 0.02 else 1)

        recent_losses, recent_grads = sane_losses[-WINDOW:], [g for g in sane_grads[-WINDOW:] if g > 0]
        expected = len(sane_losses) >= WARMUP_STEPS and (
            loss > factor * max(statistics.median(recent_losses), floor)
            or bool(recent_grads and grad > factor * statistics.median(recent_grads))
        )
        assert (detector.step_jump(loss, grad) is not None) == expected
        if expected:
            fired += 1
            continue
        expected = weights > factor * statistics.median(sane_weights[-WINDOW:])
        assert (detector.weights_jump(weights) is not None) == expected
        if expected:
            fired += 1
            continue
        detector.observe(loss, grad, weights)
        sane_losses.append(loss), sane_grads.append(grad), sane_weights.append(weights)
    assert fired > 0


def test_weight_norm_is_the_norm_of_all_parameters_together():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    expected = torch.cat([p.detach().flatten() for p in model.parameters()]).norm()
    assert weight_norm(model) == pytest.approx(float(expected), rel=1e-6)
