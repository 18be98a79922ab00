"""`key=value` overrides (tripletctl/config/overrides.py): typed like the file, reported like it, never
adding or removing a phase, and paths in them resolved against the current directory."""

from __future__ import annotations

import pytest
from helpers import MINIMAL, problems_of, write

from tripletctl.config.blocks import (
    EvalConfig,
)
from tripletctl.config.validate import load_curriculum


def test_overrides_are_converted_to_the_declared_types(tmp_path):
    path = write(tmp_path, MINIMAL)
    c = load_curriculum(
        path,
        [
            "phases.2.steps=500",
            "train.lr=3e-5",
            "model.head=[256,128]",
            "eval.every=10",
            "eval.source=org/heldout",
            "train.chunk_size=auto",
            "phases.0.chunk_size=32",
            "train.compile=true",
            "data.split=2020",
            "model.tokenizer=null",
            "train.weight_decay=0",
            "phases.1.margin=1",
            "data.load_dataset.name=pair",
        ],
    )
    assert c.phases[2].steps == 500
    assert c.train.lr == 3e-5 and isinstance(c.train.lr, float)
    assert c.phases[0].lr == 3e-5  # the phase default follows the overridden train value
    assert c.model.head == (256, 128)
    assert c.eval == EvalConfig(source="org/heldout", every=10)
    assert c.train.chunk_size == "auto" and c.phases[0].chunk_size == 32
    assert c.train.compile is True
    assert c.data.split == "2020"
    assert c.model.tokenizer is None
    assert c.train.weight_decay == 0.0 and isinstance(c.train.weight_decay, float)
    assert c.phases[1].margin == 1.0 and isinstance(c.phases[1].margin, float)
    assert c.data.load_dataset == {"name": "pair"}


def test_bad_override_value_is_reported_like_the_file(tmp_path):
    path = write(tmp_path, MINIMAL)
    problems = problems_of(path, ["train.lr=fast", "phases.1.steps=-1", "model.pooling=max"])
    assert sorted(problems) == sorted(
        [
            f"{path}: override 'train.lr=fast': train.lr must be a positive number, got 'fast'",
            f"{path}: override 'model.pooling=max': model.pooling must be one of mean, cls, got 'max'",
            f"{path}: override 'phases.1.steps=-1': phases[1] (easy): steps must be a positive integer, got -1",
        ]
    )


def test_override_batch_size_checked_against_samples_per_class(tmp_path):
    path = write(tmp_path, MINIMAL)
    [problem] = problems_of(path, ["phases.2.batch_size=1002"])
    assert problem == (
        f"{path}: override 'phases.2.batch_size=1002': phases[2] (hard): batch_size must be a "
        "multiple of data.samples_per_class (4), got 1002"
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trian.lr=1", "unknown key 'trian.lr' (did you mean 'train.lr'?)"),
        ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("phases.0.minning=random", "phases[0] (warmup): unknown key 'minning' (did you mean 'mining'?)"),
        ("phases.3.steps=1", "phases[3] does not exist: the curriculum has 3 phases (0 to 2)"),
        ("phases.last.steps=1", "'last' is not a phase index: use phases.N.KEY with N from 0 to 2"),
        ("phases.1=1", "phases[1] (easy): expected phases.1.KEY, e.g. phases.1.steps=500"),
        ("train.lr", "expected key=value, e.g. train.lr=3e-5"),
        ("model.name.x=1", "'model.name' has no sub-keys"),
    ],
)
def test_bad_override_keys_are_fatal(tmp_path, override, expected):
    path = write(tmp_path, MINIMAL)
    assert problems_of(path, [override]) == [f"{path}: override '{override}': {expected}"]


def test_override_creates_missing_block(tmp_path):
    c = load_curriculum(write(tmp_path, MINIMAL), ["eval.source=org/heldout", "train.seed=7"])
    assert c.eval is not None and c.eval.source == "org/heldout"
    assert c.train.seed == 7


def test_a_phases_override_cannot_add_or_remove_phases(tmp_path):
    path = write(tmp_path, MINIMAL)
    one = "phases=[{name: a, mining: random, batch_size: 8, steps: 1}]"
    [problem] = problems_of(path, [one])
    assert problem == (
        f"{path}: override '{one}': overrides cannot add or remove phases: the file has 3, "
        f"the override gives 1 phases; change a phase with phases.N.KEY=VALUE"
    )
    three = "phases=[" + ", ".join(f"{{name: p{i}, mining: random, batch_size: 8, steps: 1}}" for i in range(3)) + "]"
    assert [p.name for p in load_curriculum(path, [three]).phases] == ["p0", "p1", "p2"]


def test_glob_override_that_yaml_cannot_parse_is_taken_as_text(tmp_path):
    c = load_curriculum(write(tmp_path, MINIMAL), ["data.source=*.parquet"])
    assert c.data.source == "*.parquet"


def test_relative_paths_in_overrides_resolve_against_the_current_directory(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = write(folder, MINIMAL)
    monkeypatch.chdir(tmp_path)
    c = load_curriculum(path, ["data.source=./corpus/*.parquet", "model.name=../models/m"])
    assert c.data.source == str(tmp_path / "corpus" / "*.parquet")
    assert c.model.name == str(tmp_path.parent / "models" / "m")
