"""The losses of a phase (`loss:`, tripletctl/train/losses.py) against brute-force loops over their
definitions (values, gradients, stats), their memory, `validate`'s refusals, and a tiny CLI run each.

The references (tests/helpers.py, shared with the mining and guard tests) loop over anchors, positives
and negatives in plain Python, computing each distance and cosine from the embeddings; they share
nothing with the O(B²) code but the definitions.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LABELS,
    TOL,
    MaxNumel,
    check_against_reference,
    distance_of,
    text_like_embeddings,
    write_curriculum,
)
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config import choices
from tripletctl.train import losses
from tripletctl.train.mining import mine

# ----------------------------------------------------------------------------- triplet losses


@pytest.mark.parametrize("structure", ["four-classes", "uneven", "singletons", "two-classes"])
@pytest.mark.parametrize("mode", ["random", "semi-hard", "hard-negative", "batch-hard"])
def test_soft_margin_matches_the_reference(mode, structure):
    labels = LABELS[structure]()
    e = text_like_embeddings(len(labels), seed=len(labels))
    if mode == "random":  # the draws cannot be reproduced independently: soft-margin of the margin mode's picks
        g0, g1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        leaf = e.clone().requires_grad_(True)
        value, _ = mine(leaf, labels, mode, 0.2, loss="soft-margin", generator=g0)
        from tripletctl.train.mining import mine_indices

        a, p, n = mine_indices(e, labels, mode, generator=g1)
        expected = torch.stack(
            [
                F.softplus(distance_of(e[i], e[j], "euclidean") - distance_of(e[i], e[k], "euclidean"))
                for i, j, k in zip(a.tolist(), p.tolist(), n.tolist())
            ]
        ).mean()
        assert value.item() == pytest.approx(expected.item(), abs=TOL)
        return
    for distance in choices.DISTANCES:
        check_against_reference(e, labels, mode, "soft-margin", distance=distance)


def test_margin_is_todays_loss_bit_for_bit():
    labels = LABELS["uneven"]()
    e = text_like_embeddings(len(labels)).float()
    for mode in choices.MINING_MODES:
        g0, g1 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        a, b = e.clone().requires_grad_(True), e.clone().requires_grad_(True)
        old, old_stats = mine(a, labels, mode, 0.2, generator=g0)
        new, new_stats = mine(b, labels, mode, 0.2, generator=g1, loss="margin", temperature=0.5, guard=None)
        old.backward(), new.backward()
        assert old.item() == new.item() and old_stats == new_stats and torch.equal(a.grad, b.grad)


def test_soft_margin_ignores_the_margin_and_counts_misordered_triplets():
    labels = LABELS["four-classes"]()
    e = text_like_embeddings(len(labels))
    one, stats = mine(e, labels, "hard-negative", 0.2, loss="soft-margin")
    other, _ = mine(e, labels, "hard-negative", 0.9, loss="soft-margin")
    assert one.item() == other.item() > 0
    assert 0 < stats.active_fraction < 1  # not the constant 1.0 softplus > 0 would give


# ----------------------------------------------------------------------------- infonce


@pytest.mark.parametrize("structure", ["four-classes", "uneven", "singletons", "two-classes", "all-distinct"])
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_infonce_matches_the_reference(structure, temperature):
    labels = LABELS[structure]()
    check_against_reference(
        text_like_embeddings(len(labels), seed=7), labels, "batch-all", "infonce", temperature=temperature
    )


@pytest.mark.parametrize("structure", ["four-classes", "uneven", "two-classes"])
@pytest.mark.parametrize(("hardness", "guard"), [(2.0, None), (5.0, 0.9), (0.5, None)])
def test_infonce_hardness_matches_the_reference(structure, hardness, guard):
    """hardness α weights each negative by exp(α·s_an), a constant: value and gradient as the loop's."""
    labels = LABELS[structure]()
    e = text_like_embeddings(len(labels), seed=11)
    check_against_reference(e, labels, "batch-all", "infonce", hardness=hardness, guard=guard)
    plain, _ = mine(e, labels, "batch-all", 0.2, loss="infonce")
    weighted, _ = mine(e, labels, "batch-all", 0.2, loss="infonce", hardness=hardness)
    assert weighted.item() > plain.item()  # every weight exp(α·s) > 1 where the cosines are positive


@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_infonce_hardness_weighs_each_negative_by_exp_alpha_s(alpha):
    """The gradient on a negative's similarity is its share of the denominator, w·exp(s/τ)/Z: two
    negatives' gradients are in the ratio exp((s_1 - s_2)·(1/τ + α)), and the positive's is -(1 - its share)/τ."""
    tau, s_pos, s_1, s_2 = 0.05, 0.8, 0.7, 0.5
    sim = torch.tensor([[1.0, s_pos, s_1, s_2]], dtype=torch.float64, requires_grad=True)
    neg_mask = torch.tensor([[False, False, True, True]])
    out = losses.infonce(sim, torch.tensor([[1]]), torch.tensor([[True]]), neg_mask, tau, hardness=alpha)
    out.loss.backward()
    g = sim.grad[0]
    assert (g[2] / g[3]).item() == pytest.approx(math.exp((s_1 - s_2) * (1 / tau + alpha)), rel=1e-9)
    weighted = [math.exp(s_pos / tau), math.exp(s_1 / tau + alpha * s_1), math.exp(s_2 / tau + alpha * s_2)]
    assert out.loss.item() == pytest.approx(-math.log(weighted[0] / sum(weighted)), rel=1e-9)
    assert g[1].item() == pytest.approx(-(1 - weighted[0] / sum(weighted)) / tau, rel=1e-9)
    assert g[0].item() == 0.0


@pytest.mark.parametrize("distance", choices.DISTANCES)
def test_infonce_with_memory_matches_the_reference(distance):
    """Memory rows join as positives and negatives by label; no gradient reaches them."""
    labels = LABELS["four-classes"]()
    memory = (text_like_embeddings(10, seed=3), torch.tensor([0, 1, 2, 3, 9, 9, 8, 0, 1, 7]))
    _, stats = check_against_reference(
        text_like_embeddings(16, seed=2), labels, "batch-all", "infonce", memory=memory, distance=distance
    )
    assert stats.memory_rows == 10


def test_infonce_pairs_and_triplets_labels():
    """Pairs: each pair its own class; triplets: given negatives have labels of their own (never anchors)."""
    pairs = torch.arange(12) // 2
    check_against_reference(text_like_embeddings(12, seed=4), pairs, "batch-all", "infonce")
    triplets = torch.tensor([0, 0, 100, 1, 1, 101, 2, 2, 102])  # anchor, positive, given negative
    _, stats = check_against_reference(text_like_embeddings(9, seed=5), triplets, "batch-all", "infonce")
    assert stats.num_triplets == 6 and stats.skipped_anchors == 3


def test_infonce_is_stable_at_a_tiny_temperature_and_collapsed_embeddings():
    labels = LABELS["four-classes"]()
    leaf = text_like_embeddings(16).float().requires_grad_(True)
    value, _ = mine(leaf, labels, "batch-all", 0.2, loss="infonce", temperature=1e-4)
    value.backward()
    assert math.isfinite(value.item()) and torch.isfinite(leaf.grad).all()
    same = torch.ones(16, 4, requires_grad=True)
    value, stats = mine(F.normalize(same, dim=1), labels, "batch-all", 0.2, loss="infonce")
    value.backward()
    assert value.item() == pytest.approx(math.log(1 + 12), abs=1e-5)  # 12 negatives as close as the positive
    assert torch.isfinite(same.grad).all() and stats.embedding_spread == pytest.approx(0, abs=1e-6)


def test_infonce_with_nothing_valid_is_a_connected_zero():
    leaf = text_like_embeddings(6).requires_grad_(True)
    value, stats = mine(leaf, torch.arange(6), "batch-all", 0.2, loss="infonce")
    assert value.item() == 0.0 and value.grad_fn is not None and stats.num_triplets == 0
    value.backward()


@pytest.mark.parametrize("labels", [torch.arange(1500) // 750, torch.arange(1500) // 4], ids=["two", "fours"])
def test_infonce_memory_is_quadratic(labels):
    b = len(labels)
    leaf = F.normalize(torch.randn(b, 16, generator=torch.Generator().manual_seed(0)), dim=1).requires_grad_(True)
    probe = MaxNumel()
    with probe:
        value, _ = mine(leaf, labels, "batch-all", 0.2, loss="infonce", guard=0.9)
        value.backward()
    assert torch.isfinite(leaf.grad).all()
    assert b * b <= probe.max_numel < b**3 / 8, (probe.op, probe.max_numel)


def test_infonce_is_bf16_safe():
    labels = LABELS["four-classes"]()
    e = text_like_embeddings(16)
    exact, _ = mine(e, labels, "batch-all", 0.2, loss="infonce")
    low, _ = mine(e.bfloat16(), labels, "batch-all", 0.2, loss="infonce")
    assert low.dtype == torch.float32 and low.item() == pytest.approx(exact.item(), rel=0.05)


# ----------------------------------------------------------------------------- names and refusals


def test_mine_refuses_combinations_without_meaning():
    e, labels = text_like_embeddings(8), torch.arange(8) // 2
    with pytest.raises(ValueError, match="unknown loss"):
        mine(e, labels, "batch-hard", 0.2, loss="hinge")
    with pytest.raises(ValueError, match="mining must be batch-all"):
        mine(e, labels, "batch-hard", 0.2, loss="infonce")
    with pytest.raises(ValueError, match="no batch-all form"):
        mine(e, labels, "batch-all", 0.2, loss="soft-margin")
    with pytest.raises(ValueError, match="not random"):
        mine(e, labels, "random", 0.2, guard=0.9)
    with pytest.raises(ValueError, match="hardness_alpha weights the negatives of loss infonce, not loss margin"):
        mine(e, labels, "batch-all", 0.2, hardness=2.0)
    with pytest.raises(ValueError, match="non-negative"):
        mine(e, labels, "batch-all", 0.2, loss="infonce", hardness=-1.0)


def _validate(tmp_path, *overrides):
    path = write_curriculum(tmp_path, steps=(2, 2, 2))
    return CliRunner().invoke(app, ["validate", str(path), *overrides])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["phases.2.loss=infonce"], "phases[2] (batch-hard): mining must be batch-all with loss infonce"),
        (["phases.0.loss=soft-margin", "phases.0.mining=batch-all"], "phases[0] (semi-hard): loss soft-margin has no"),
        (
            ["phases.1.loss=infonce", "phases.1.mining=batch-all", "phases.1.on_collapse=fallback"],
            "phases[1] (hard-negative): on_collapse fallback switches to semi-hard mining",
        ),
        (
            ["phases.0.mining=random", "phases.0.false_negative_guard=0.9"],
            "phases[0] (semi-hard): false_negative_guard applies to the hard modes",
        ),
        (["phases.0.false_negative_guard=1.5"], "false_negative_guard must be a number in (0, 1]"),
        (["phases.0.loss=hinge"], "loss must be one of margin, soft-margin, infonce"),
        (["phases.0.temperature=0"], "temperature must be a positive number"),
        (
            ["phases.1.hardness_alpha=2"],
            "phases[1] (hard-negative): hardness_alpha weights the negatives of loss infonce, not loss margin",
        ),
        (["phases.2.hardness_alpha=-1"], "hardness_alpha must be a non-negative number"),
    ],
)
def test_validate_refuses_with_one_line(tmp_path, overrides, message):
    result = _validate(tmp_path, *overrides)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert any(message in line for line in lines), result.output
    assert "Traceback" not in result.output


def test_validate_shows_the_loss_and_guard_only_when_used(tmp_path):
    plain = _validate(tmp_path)
    assert plain.exit_code == 0 and "infonce" not in plain.output and "guard" not in plain.output
    used = _validate(
        tmp_path, "phases.2.loss=infonce", "phases.2.mining=batch-all", "phases.1.false_negative_guard=0.95"
    )
    assert used.exit_code == 0, used.output
    assert "infonce τ=0.05" in used.output and "ρ=0.95" in used.output and "α=" not in used.output
    weighted = _validate(tmp_path, "phases.2.loss=infonce", "phases.2.mining=batch-all", "phases.2.hardness_alpha=2")
    assert weighted.exit_code == 0 and "infonce τ=0.05 α=2" in weighted.output, weighted.output


# ----------------------------------------------------------------------------- end to end


def _steps(run, phase_dir):
    lines = (run / phase_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r]


@pytest.mark.slow
@pytest.mark.parametrize("loss", choices.LOSSES)
def test_a_tiny_run_per_loss(tmp_path, loss):
    """The real CLI, three phases with chunked gradient caching (chunks of 16 rows, batches of 16-64),
    a memory in the last phase, the guard in the second and an `until:` condition on the first."""
    path = write_curriculum(tmp_path, steps=(3, 2, 2), checkpoint_every=0, chunk_size=8)
    mode = {"infonce": "batch-all", "soft-margin": "batch-hard"}.get(loss)
    overrides = [f"phases.{i}.loss={loss}" for i in range(3)]
    overrides += [f"phases.{i}.mining={mode}" for i in range(3)] if mode else []
    # ρ = 1: skip the negatives closer than the positive. A smaller ρ skips every negative of this
    # untrained model, whose embeddings are all alike (cosines ~0.95; docs/mining.md)
    overrides += ["phases.1.false_negative_guard=1.0", "phases.2.memory={size: 64, start_step: 1}"]
    overrides += ["phases.0.until={loss_below: 0.0001, min_steps: 2}"]
    overrides += ["phases.2.hardness_alpha=2"] if loss == "infonce" else []
    result = CliRunner().invoke(app, ["train", str(path), *overrides])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    for phase_dir, steps in (("phase-0-semi-hard", 3), ("phase-1-hard-negative", 2), ("phase-2-batch-hard", 2)):
        records = _steps(run, phase_dir)
        assert len(records) == steps
        for r in records:
            assert math.isfinite(r["loss"]) and math.isfinite(r["batch_hard_loss"]) and r["grad_norm"] > 0
            assert ("guard_skipped" in r) == (phase_dir == "phase-1-hard-negative")
            assert r.get("guard_skipped", 1) > 0
        assert all(r["chunks"] > 1 for r in records)
    assert [r["memory_rows"] for r in _steps(run, "phase-2-batch-hard")] == [0, 64]
