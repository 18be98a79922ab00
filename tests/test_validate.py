"""Curriculum validation (tripletctl/config/validate.py): the whole tree, every problem reported at
once with the file's name, what one block asks of another, overrides, and the `validate` command
printing the plan or exiting 2 (one block: test_block_checks.py; the phases: test_phase_checks.py).
Pure Python: no model, no data, no network."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import FACENET, MINIMAL, QUICKSTART, REPO, edit, only, phases_with, problems_of, write
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config.blocks import (
    DataConfig,
    ModelConfig,
    TrainConfig,
)
from tripletctl.config.validate import load_curriculum
from tripletctl.core.errors import ConfigError


def test_minimal_curriculum_fills_defaults_and_resolves_phases_from_train(tmp_path):
    c = load_curriculum(write(tmp_path, MINIMAL))
    assert c.model == ModelConfig(name="bert-base-uncased")
    assert c.data == DataConfig(source="org/corpus")
    assert c.train == TrainConfig()
    assert c.eval is None
    assert [p.name for p in c.phases] == ["warmup", "easy", "hard"]
    for phase in c.phases:
        assert phase.margin == 0.2
        assert (phase.lr, phase.warmup_steps, phase.distance, phase.fallback, phase.chunk_size, phase.on_collapse) == (
            2e-5,
            100,
            "euclidean",
            "hardest",
            "auto",
            "warn",
        )


def test_missing_file_is_a_config_error(tmp_path):
    [problem] = problems_of(tmp_path / "nope.yaml")
    assert problem.startswith(f"{tmp_path / 'nope.yaml'}: cannot read the curriculum")


def test_messages_use_the_path_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, edit(train={"lr": "fast"}))
    assert problems_of("curriculum.yaml") == ["curriculum.yaml: train.lr must be a positive number, got 'fast'"]


def test_invalid_samples_per_class_does_not_cascade_into_batch_errors(tmp_path):
    path = write(tmp_path, edit(data={"source": "x", "samples_per_class": 1}))
    assert problems_of(path) == [f"{path}: data.samples_per_class must be an integer >= 2, got 1"]


def test_unknown_top_level_and_block_keys(tmp_path):
    path = write(tmp_path, MINIMAL + "evl: {}\ntrain:\n  lrr: 1.0\n  sead: 3\n  gizmo: 1\n")
    problems = problems_of(path)
    assert f"{path}: unknown key 'evl' (did you mean 'eval'?)" in problems
    assert f"{path}: unknown key 'train.lrr' (did you mean 'train.lr'?)" in problems
    assert f"{path}: unknown key 'train.sead' (did you mean 'train.seed'?)" in problems
    assert f"{path}: unknown key 'train.gizmo'" in problems


def test_pairs_layout_requires_two_samples_per_class(tmp_path):
    path = write(tmp_path, edit(data={"source": "x", "layout": "pairs"}))
    [problem] = problems_of(path)
    assert problem == (
        f"{path}: data.samples_per_class must be 2 when data.layout is pairs (each pair is its own class), got 4"
    )
    load_curriculum(write(tmp_path, edit(data={"source": "x", "layout": "pairs", "samples_per_class": 2})))


def test_max_buffered_rows_must_fit_the_largest_batch(tmp_path):
    path = write(tmp_path, edit(data={"source": "x", "max_buffered_rows": 32}))
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: data.max_buffered_rows must be at least the largest phase batch_size (64)")


def test_all_problems_are_reported_together(tmp_path):
    phases = phases_with(batch_size=1002, mining="semihard", steps=0)
    phases[0]["minning"] = phases[0].pop("mining")
    path = write(tmp_path, edit(train={"lr": "fast"}, model={"name": "m", "pooling": "max"}, phases=phases))
    problems = problems_of(path, ["phases.9.steps=1", "trian.lr=1"])
    assert len(problems) == 9, problems
    assert all(p.startswith(f"{path}: ") for p in problems)
    for fragment in [
        "train.lr must be",
        "model.pooling",
        "phases[0] (warmup): unknown key 'minning'",
        "phases[0] (warmup): missing required key 'mining'",
        "phases[2] (hard): mining",
        "phases[2] (hard): steps",
        "phases[2] (hard): batch_size must be a multiple",
        "override 'phases.9.steps=1'",
        "override 'trian.lr=1'",
    ]:
        only(problems, fragment)


def test_loading_a_curriculum_never_imports_torch():
    """`validate` reads and prints a curriculum: it must not pay for torch (or transformers) start-up."""
    code = (
        "import sys, tripletctl.config.validate, tripletctl.config.plan; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_validate_command_prints_the_plan():
    result = CliRunner().invoke(app, ["validate", str(QUICKSTART)])
    assert result.exit_code == 0, result.output
    assert "semi-hard" in result.output and "batch-hard" in result.output


def test_validate_command_accepts_overrides():
    result = CliRunner().invoke(app, ["validate", str(FACENET), "phases.1.steps=500", "train.lr=3e-5"])
    assert result.exit_code == 0, result.output


def test_validate_command_exits_2_with_every_error(tmp_path):
    path = write(tmp_path, edit(train={"lr": "fast"}, phases=phases_with(batch_size=1002)))
    result = CliRunner().invoke(app, ["validate", str(path), "phases.7.steps=1"])
    assert result.exit_code == 2
    output = " ".join(result.output.split())  # undo terminal wrapping
    assert "train.lr must be a positive number, got 'fast'" in output
    assert "phases[2] (hard): batch_size must be a multiple" in output
    assert "override 'phases.7.steps=1'" in output


def test_python_dash_m_validate_quickstart(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "tripletctl", "validate", str(QUICKSTART)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "batch-hard" in done.stdout


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "the curriculum is empty: expected model, data, train and phases"),
        (
            "- model\n",
            "expected a mapping with model, data, train, phases (and optional eval) at the top, got ['model']",
        ),
    ],
)
def test_empty_or_non_mapping_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert problems_of(path) == [f"{path}: {expected}"]


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("trian.seed9994=1", "train.seed"),
        ("trian.seed=1", "train.seed"),
        ("phase.1.steps=3", "phases.1.steps"),
        ("phasse.1.until.window=3", "phases.1.until.window"),
        ("trainn=3", "train"),
        ("xyzzy.q=1", None),
    ],
)
def test_an_unknown_block_suggests_only_keys_that_exist(tmp_path, override, suggestion):
    """Issue 23 #12: `trian.seed9994` suggested `train.seed9994`, which is not a key either."""
    [problem] = problems_of(write(tmp_path, MINIMAL), [override])
    hint = re.search(r"did you mean '([^']+)'", problem)
    assert (hint.group(1) if hint else None) == suggestion, problem
    if suggestion is not None:  # the suggested key is one the loader knows
        try:
            load_curriculum(write(tmp_path, MINIMAL), [suggestion + override[override.index("=") :]])
        except ConfigError as error:
            assert not any("unknown key" in p for p in error.problems), error.problems


def test_keep_best_takes_an_eval_metric_and_needs_an_eval_block(tmp_path):
    path = write(tmp_path, MINIMAL + "eval:\n  source: org/heldout\n")
    assert load_curriculum(path).train.keep_best is None  # off by default
    assert load_curriculum(path, ["train.keep_best=map@r"]).train.keep_best == "map@r"
    with pytest.raises(ConfigError) as error:
        load_curriculum(path, ["train.keep_best=recall@2"])
    assert error.value.problems == [
        f"{path}: override 'train.keep_best=recall@2': train.keep_best must be one of recall@1, recall@5, "
        "recall@10, map@r, r_precision, triplet_accuracy or null, got 'recall@2' (did you mean 'recall@5'?)"
    ]
    with pytest.raises(ConfigError) as error:
        load_curriculum(write(tmp_path, MINIMAL, "no_eval.yaml"), ["train.keep_best=recall@1"])
    assert "train.keep_best (recall@1) needs an eval block" in error.value.problems[0]


def test_keep_best_names_are_the_scores_evaluation_reports():
    import torch

    from tripletctl.config.until import EVAL_METRICS
    from tripletctl.evaluation.retrieval import retrieval_metrics

    metrics = retrieval_metrics(torch.randn(12, 4), torch.arange(12) % 3)
    scores = {k for k, v in metrics.items() if isinstance(v, float)}
    assert set(EVAL_METRICS) == scores


def test_a_tilde_is_expanded_in_every_path_key_the_same_way(tmp_path, monkeypatch):
    """train.output_dir (relative to the current directory) too: it used to make a literal ./~/runs/x,
    while data.source expanded it; validate --json shows the resolved paths."""
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    (home / "data" / "t.jsonl").write_text("")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    overrides = ["train.output_dir=~/runs/x", "model.name=~/models/m", "data.source=~/data/t.jsonl"]
    plan = load_curriculum(QUICKSTART, overrides)
    assert plan.train.output_dir == str(home / "runs" / "x")
    assert plan.model.name == str(home / "models" / "m") and plan.data.source == str(home / "data" / "t.jsonl")
    shown = CliRunner().invoke(app, ["validate", str(QUICKSTART), *overrides[:2], "--json"])
    assert f'"output_dir": "{home / "runs" / "x"}"' in shown.output, shown.output


def test_a_path_component_over_255_bytes_is_a_problem():
    problem = only(problems_of(QUICKSTART, ["train.output_dir=runs/" + "x" * 300]), "train.output_dir")
    assert "at most 255 bytes (one has 300)" in problem
