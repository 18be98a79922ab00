"""`train.lr_scaling` (tripletctl/config/lr_scaling.py): the pure function, the schedule that uses it,
the plan that shows it and the learning rate a real run logs."""

from __future__ import annotations

import json
import math

import pytest
from helpers import write_curriculum
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config.lr_scaling import phase_peak_lr, reference_batch, scaled_lr
from tripletctl.config.validate import load_curriculum
from tripletctl.train.lr import get_lr


@pytest.mark.parametrize(("scaling", "factor"), [("none", 1.0), ("sqrt", 2.0), ("linear", 4.0)])
def test_scaled_lr(scaling, factor):
    assert scaled_lr(1e-3, 2000, scaling, 500) == pytest.approx(1e-3 * factor, rel=1e-12)
    assert scaled_lr(1e-3, 500, scaling, 500) == 1e-3  # the reference batch keeps its rate exactly
    assert scaled_lr(1e-3, 125, scaling, 500) == pytest.approx(1e-3 / factor, rel=1e-12)


def test_scaled_lr_refuses_nonsense():
    with pytest.raises(ValueError, match="unknown lr_scaling"):
        scaled_lr(1e-3, 10, "cube", 10)
    with pytest.raises(ValueError, match="positive"):
        scaled_lr(1e-3, 10, "sqrt", 0)


def test_phase_peak_lr_defaults_to_the_first_phase_and_feeds_the_schedule(tmp_path):
    path = write_curriculum(tmp_path)  # batches 16, 32, 64
    plain = load_curriculum(path)
    assert [phase_peak_lr(plain, i) for i in range(3)] == [p.lr for p in plain.phases]
    c = load_curriculum(path, ["train.lr_scaling=sqrt", "phases.1.lr=4e-3"])
    assert reference_batch(c) == 16
    assert [phase_peak_lr(c, i) for i in range(3)] == pytest.approx([1e-3, 4e-3 * math.sqrt(2), 2e-3])
    c = load_curriculum(path, ["train.lr_scaling=linear", "train.lr_reference_batch=32"])
    assert [phase_peak_lr(c, i) for i in range(3)] == pytest.approx([0.5e-3, 1e-3, 2e-3])
    phase = c.phases[2]
    peak = phase_peak_lr(c, 2)
    assert get_lr(phase.warmup_steps, phase, "none", peak=peak) == pytest.approx(peak)
    assert get_lr(0, phase, "linear", peak=peak) == pytest.approx(peak / phase.warmup_steps)


def test_validate_shows_the_effective_rate(tmp_path):
    path = write_curriculum(tmp_path)
    runner = CliRunner()
    plain = runner.invoke(app, ["validate", str(path)])
    assert plain.exit_code == 0 and "lr scaling" not in plain.output
    scaled = runner.invoke(app, ["validate", str(path), "train.lr_scaling=linear"])
    assert scaled.exit_code == 0, scaled.output
    assert "lr scaling: linear, the lr column is lr × (batch / 16)^1" in scaled.output
    rows = [line.split() for line in scaled.output.splitlines() if line.strip()[:1] in "012"]
    assert [row[-2] for row in rows[:3]] == ["0.001", "0.002", "0.004"]
    bad = runner.invoke(app, ["validate", str(path), "train.lr_scaling=cube", "train.lr_reference_batch=0"])
    assert bad.exit_code == 2
    assert "train.lr_scaling must be one of none, sqrt, linear, got 'cube'" in bad.output
    assert "train.lr_reference_batch must be a positive integer, got 0" in bad.output


@pytest.mark.slow
def test_a_run_logs_the_scaled_rate(tmp_path):
    path = write_curriculum(tmp_path, steps=(1, 1, 1), checkpoint_every=0, warmup_steps=0, decay="none")
    result = CliRunner().invoke(app, ["train", str(path), "train.lr_scaling=sqrt"])
    assert result.exit_code == 0, result.output
    logged = []
    for phase_dir in sorted((tmp_path / "run").glob("phase-*")):
        lines = (phase_dir / "metrics.jsonl").read_text().splitlines()
        logged += [r["lr"] for r in map(json.loads, lines) if "event" not in r]
    assert logged == pytest.approx([1e-3, 1e-3 * math.sqrt(2), 2e-3])
