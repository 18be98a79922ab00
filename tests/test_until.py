"""The `until:` block (tripletctl/config/until.py) as `validate` loads it: defaults, every problem on
its own line, overrides; what the conditions do while training is tests/test_conditions.py."""

from __future__ import annotations

import pytest
import yaml
from helpers import MINIMAL, edit, only, phases_with, problems_of, write
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config.blocks import (
    curriculum_to_dict,
)
from tripletctl.config.until import Plateau, UntilConfig
from tripletctl.config.validate import load_curriculum


def test_until_loads_with_defaults_and_round_trips(tmp_path):
    phases = phases_with(
        steps=200, until={"active_fraction_below": 0.05, "plateau": {"metric": "batch_hard_loss", "patience": 30}}
    )
    phases[0]["until"] = {
        "loss_below": 0.01,
        "min_steps": 3,
        "window": 5,
        "combine": "all",
        "batch_hard_loss_below": 0.1,
    }
    c = load_curriculum(write(tmp_path, edit(phases=phases)))
    assert c.phases[2].until == UntilConfig(
        min_steps=20, window=20, combine="any", active_fraction_below=0.05, plateau=Plateau("batch_hard_loss", 30, 0.0)
    )
    assert c.phases[0].until.min_steps == 3 and c.phases[0].until.combine == "all"
    assert c.phases[1].until is None
    dumped = write(tmp_path, yaml.safe_dump(curriculum_to_dict(c), sort_keys=False), "as-run.yaml")
    assert load_curriculum(dumped) == c


def test_until_problems_are_all_reported_one_line_each(tmp_path):
    phases = phases_with(
        until={
            "loss_belw": 0.1,
            "active_fraction_below": 1.5,
            "window": 0,
            "plateau": {"metric": "recall@1", "patience": 0, "min_delta": 2, "extra": 1},
            "eval_plateau": {"metric": "recall@1", "patience": 2},
            "min_steps": 11,
        }
    )
    phases[0]["until"] = {"combine": "some"}
    problems = problems_of(write(tmp_path, edit(phases=phases)))
    assert only(problems, "unknown key 'until.loss_belw'").endswith("(did you mean 'until.loss_below'?)")
    only(problems, "phases[2] (hard): until.active_fraction_below must be a number in (0, 1], got 1.5")
    only(problems, "until.window must be a positive integer, got 0")
    only(problems, "until.plateau.metric must be one of loss, batch_hard_loss, active_fraction, got 'recall@1'")
    only(problems, "until.plateau.patience must be a positive integer, got 0")
    only(problems, "until.plateau.min_delta must be a relative improvement in [0, 1)")
    only(problems, "unknown key 'until.plateau.extra'")
    only(problems, "phases[2] (hard): until.min_steps must be at most steps (10), got 11")
    only(problems, "phases[2] (hard): until.eval_plateau needs held-out evals inside the phase: set eval.every")
    only(problems, "phases[0] (warmup): until.combine must be one of any, all, got 'some'")
    only(problems, "phases[0] (warmup): until must set at least one condition")
    assert len(problems) == 11, problems
    assert all("\n" not in p and p.startswith(str(tmp_path)) for p in problems)


def test_eval_plateau_needs_eval_every(tmp_path):
    plateau = {"eval_plateau": {"metric": "map@r", "patience": 3}}
    no_every = edit(phases=phases_with(until=plateau), eval={"source": "org/heldout"})
    only(problems_of(write(tmp_path, no_every)), "got eval.every 0")
    ok = edit(phases=phases_with(until=plateau), eval={"source": "org/heldout", "every": 2})
    assert load_curriculum(write(tmp_path, ok)).phases[2].until.eval_plateau == Plateau("map@r", 3)


def test_until_keys_can_be_overridden(tmp_path):
    path = write(tmp_path, MINIMAL)
    c = load_curriculum(
        path,
        [
            "phases.0.until.loss_below=0.2",
            "phases.0.until.plateau.metric=loss",
            "phases.0.until.plateau.patience=4",
            "phases.1.until={active_fraction_below: 0.1}",
        ],
    )
    assert c.phases[0].until == UntilConfig(min_steps=1, loss_below=0.2, plateau=Plateau("loss", 4))
    assert c.phases[1].until.active_fraction_below == 0.1
    bad = problems_of(path, ["phases.0.until.loss_below=low", "phases.0.until.min_steps=50"])
    assert (
        "override 'phases.0.until.loss_below=low': phases[0] (warmup): until.loss_below must be a positive "
        "number, got 'low'" in " ".join(bad)
    )
    only(bad, "override 'phases.0.until.min_steps=50'")


def test_validate_command_reports_until_problems_with_exit_2(tmp_path):
    path = write(tmp_path, edit(phases=phases_with(until={"plateau": {"metric": "loss"}, "min_steps": 99})))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "until.min_steps must be at most steps (10), got 99" in output
    assert "missing required key 'until.plateau.patience'" in output


BAD_STEPS = ["abc", "2.5", "0", "null", "true", "eighty"]


@pytest.mark.parametrize("value", BAD_STEPS)
@pytest.mark.parametrize("given", ["override", "file"])
def test_bad_steps_of_a_phase_with_until_are_one_problem_each_never_a_traceback(tmp_path, value, given):
    """Issue 23 #6: an invalid `steps` left `until.min_steps` without its default: a TypeError, exit 1."""
    until = "{active_fraction_below: 0.5}"
    text = MINIMAL.replace("    steps: 10\n  - name: easy", f"    steps: {value}\n    until: {until}\n  - name: easy")
    if given == "override":
        text = MINIMAL
        args = [f"phases.0.until={until}", f"phases.0.steps={value}", "train.lr=fast"]
    else:
        text = text.replace("phases:", "train:\n  lr: fast\nphases:")
        args = []
    path = write(tmp_path, text)
    result = CliRunner().invoke(app, ["validate", str(path), *args])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    output = " ".join(result.output.split())
    assert "Traceback" not in output
    assert "phases[0] (warmup): steps must be a positive integer, got" in output
    assert "train.lr must be a positive number, got 'fast'" in output  # the other error is not hidden
    assert output.count("error:") == 3  # "2 problems", then one line each
