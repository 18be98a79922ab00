"""Curriculum loading: every error names file, phase and key; overrides are typed; paths resolve;
the dict form round-trips. Pure Python: no model, no data, no network."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import QUICKSTART, REPO
from rich.console import Console
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config.blocks import (
    Curriculum,
    DataConfig,
    EvalConfig,
    MemoryConfig,
    ModelConfig,
    PhaseConfig,
    TrainConfig,
    curriculum_to_dict,
)
from tripletctl.config.plan import plan_table
from tripletctl.config.until import Plateau, UntilConfig
from tripletctl.config.validate import load_curriculum
from tripletctl.core.errors import ConfigError

FACENET = REPO / "curricula" / "facenet.yaml"

MINIMAL = """\
model:
  name: bert-base-uncased
data:
  source: org/corpus
phases:
  - name: warmup
    mining: semi-hard
    batch_size: 16
    steps: 10
  - name: easy
    mining: hard-negative
    batch_size: 32
    steps: 10
  - name: hard
    mining: batch-hard
    batch_size: 64
    steps: 10
"""


def write(tmp_path: Path, text: str, name: str = "curriculum.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def edit(**changes) -> str:
    """MINIMAL with some blocks replaced (dicts) or removed (None)."""
    tree = yaml.safe_load(MINIMAL)
    for key, value in changes.items():
        if value is None:
            tree.pop(key, None)
        else:
            tree[key] = value
    return yaml.safe_dump(tree, sort_keys=False)


def problems_of(path: Path | str, overrides: list[str] = ()) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_curriculum(path, overrides)
    return caught.value.problems


def only(problems: list[str], fragment: str) -> str:
    matching = [p for p in problems if fragment in p]
    assert len(matching) == 1, (fragment, problems)
    return matching[0]


def phases_with(**changes) -> list[dict]:
    """MINIMAL's phases with keys of phase 2 ('hard') changed."""
    phases = yaml.safe_load(MINIMAL)["phases"]
    phases[2].update(changes)
    return phases


# ---------------------------------------------------------------- valid files


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


def test_phase_overrides_win_over_train_block(tmp_path):
    text = edit(
        train={"lr": 1e-4, "distance": "squared-euclidean", "chunk_size": 64, "on_collapse": "stop"},
        phases=phases_with(lr=5e-6, fallback="easiest", chunk_size="auto", warmup_steps=3, margin=0.5),
    )
    c = load_curriculum(write(tmp_path, text))
    assert (c.phases[0].lr, c.phases[0].distance, c.phases[0].chunk_size, c.phases[0].on_collapse) == (
        1e-4,
        "squared-euclidean",
        64,
        "stop",
    )
    hard = c.phases[2]
    assert (hard.lr, hard.fallback, hard.chunk_size, hard.warmup_steps, hard.margin) == (
        5e-6,
        "easiest",
        "auto",
        3,
        0.5,
    )
    assert hard.distance == "squared-euclidean"


def test_chunk_tokens_is_a_budget_that_phases_inherit_or_replace(tmp_path):
    text = edit(train={"chunk_tokens": 8192}, phases=phases_with(chunk_size=64))
    c = load_curriculum(write(tmp_path, text))
    assert (c.train.chunk_size, c.train.chunk_tokens) == ("auto", 8192)
    assert (c.phases[0].chunk_size, c.phases[0].chunk_tokens) == ("auto", 8192)  # inherited budget
    assert (c.phases[2].chunk_size, c.phases[2].chunk_tokens) == (64, None)  # the phase's rows win
    text = edit(train={"chunk_size": 32}, phases=phases_with(chunk_tokens="auto"))
    c = load_curriculum(write(tmp_path, text))
    assert (c.phases[0].chunk_size, c.phases[0].chunk_tokens) == (32, None)
    assert (c.phases[2].chunk_size, c.phases[2].chunk_tokens) == ("auto", "auto")  # the phase's budget wins
    again = load_curriculum(write(tmp_path, yaml.safe_dump(curriculum_to_dict(c)), "again.yaml"))
    assert again.phases == c.phases and again.train == c.train
    assert TrainConfig().chunk_tokens is None


def test_chunk_size_and_chunk_tokens_together_are_refused(tmp_path):
    path = write(tmp_path, edit(train={"chunk_size": 64, "chunk_tokens": 4096}))
    assert problems_of(path) == [
        f"{path}: train: set chunk_size (rows per chunk) or chunk_tokens (a token budget), "
        f"not both, got chunk_size 64 and chunk_tokens 4096"
    ]
    path = write(tmp_path, edit(phases=phases_with(chunk_size=64, chunk_tokens="auto")))
    assert problems_of(path) == [
        f"{path}: phases[2] (hard): set chunk_size (rows per chunk) or chunk_tokens "
        f"(a token budget), not both, got chunk_size 64 and chunk_tokens 'auto'"
    ]
    path = write(tmp_path, edit(phases=phases_with(chunk_tokens=0)))
    assert problems_of(path) == [f"{path}: phases[2] (hard): chunk_tokens must be a positive integer or 'auto', got 0"]


def test_quickstart_validates_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = load_curriculum(QUICKSTART)
    assert c.model.name == str(REPO / "curricula" / "quickstart" / "tiny-bert")
    assert c.data.source == str(REPO / "curricula" / "quickstart" / "train.jsonl")
    assert c.eval is not None and c.eval.source == str(REPO / "curricula" / "quickstart" / "heldout.jsonl")
    assert c.train.output_dir == "runs/quickstart"  # relative to where training runs
    assert [p.mining for p in c.phases] == ["semi-hard", "hard-negative", "batch-hard"]
    assert isinstance(c.train.lr, float) and c.train.lr == 1e-3


def test_facenet_validates_offline_with_the_shipped_plan():
    c = load_curriculum(FACENET)
    assert c.model.name == "bert-base-uncased"
    assert [(p.mining, p.loss, p.batch_size, p.margin) for p in c.phases] == [
        ("semi-hard", "margin", 500, 0.5),
        ("batch-all", "infonce", 2000, 0.2),
    ]
    assert c.train.lr_scaling == "sqrt" and c.train.lr_reference_batch == 500
    assert c.train.lr == 2e-5 and c.train.precision == "auto" and c.train.chunk_size == "auto"
    assert c.train.warmup_steps > 0
    assert c.eval is not None and c.eval.split == "test"
    assert not os.path.exists(c.data.source)  # a hub name, left untouched


def test_dataclasses_are_frozen_and_curriculum_owns_its_dicts(tmp_path):
    kwargs = {"name": "pair", "data_files": ["a.parquet"]}
    c = load_curriculum(write(tmp_path, edit(data={"source": "org/corpus", "load_dataset": kwargs})))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.train.lr = 1.0  # type: ignore[misc]
    assert c.data.load_dataset == kwargs
    assert isinstance(c.phases, tuple) and isinstance(c.model.head, tuple)
    other = load_curriculum(tmp_path / "curriculum.yaml")
    c.data.load_dataset["data_files"].append("b.parquet")
    assert other.data.load_dataset == kwargs  # no shared state between loads


def test_memory_is_off_by_default_inherited_from_train_and_overridable(tmp_path):
    assert load_curriculum(write(tmp_path, MINIMAL)).phases[0].memory is None
    text = edit(train={"memory": {"size": 4096}}, phases=phases_with(memory={"size": 512, "start_step": 100}))
    c = load_curriculum(write(tmp_path, text))
    assert c.train.memory == MemoryConfig(size=4096, start_step=0)
    assert c.phases[0].memory == MemoryConfig(size=4096, start_step=0)  # from the train block
    assert c.phases[2].memory == MemoryConfig(size=512, start_step=100)
    off = load_curriculum(write(tmp_path, text), ["phases.0.memory=null", "phases.1.memory={size: 8}"])
    assert off.phases[0].memory is None and off.phases[1].memory == MemoryConfig(size=8)
    assert load_curriculum(write(tmp_path, yaml.safe_dump(curriculum_to_dict(c)))) == c  # round trip
    console = Console(record=True, width=160)
    console.print(plan_table(c))
    assert "512 from step 100" in console.export_text()


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        (4096, "got 4096"),
        ({"start_step": 3}, "size is missing"),
        ({"size": 0}, "got {'size': 0}"),
        ({"size": 64, "start_step": -1}, "start_step"),
        ({"size": 64, "sise": 3}, "unknown key 'sise'; did you mean 'size'?"),
    ],
)
def test_bad_memory_values_name_file_phase_and_key(tmp_path, value, hint):
    path = write(tmp_path, edit(phases=phases_with(memory=value)))
    with pytest.raises(ConfigError) as info:
        load_curriculum(path)
    message = str(info.value)
    assert f"{path}: phases[2] (hard): memory must be null or a mapping {{size: M, start_step: S}}" in message
    assert hint in message


def test_yaml_exponent_without_dot_is_read_as_a_number(tmp_path):
    c = load_curriculum(write(tmp_path, MINIMAL + "train:\n  lr: 3e-5\n"))
    assert c.train.lr == 3e-5 and isinstance(c.train.lr, float)


# ---------------------------------------------------------------- errors


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  name: bert\ndata:\n  source: [unclosed\nphases: []\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: line ")
    assert "malformed YAML" in problem


def test_malformed_yaml_line_number_is_ones_based(tmp_path):
    path = write(tmp_path, "model:\n  name: bert\n bad: indent\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: line 3: malformed YAML: ")


def test_missing_file_is_a_config_error(tmp_path):
    [problem] = problems_of(tmp_path / "nope.yaml")
    assert problem.startswith(f"{tmp_path / 'nope.yaml'}: cannot read the curriculum")


def test_messages_use_the_path_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, edit(train={"lr": "fast"}))
    assert problems_of("curriculum.yaml") == ["curriculum.yaml: train.lr must be a positive number, got 'fast'"]


def test_unknown_phase_key_with_did_you_mean(tmp_path):
    phases = yaml.safe_load(MINIMAL)["phases"]
    phases[0]["minning"] = phases[0].pop("mining")
    path = write(tmp_path, edit(phases=phases))
    problems = problems_of(path)
    assert f"{path}: phases[0] (warmup): unknown key 'minning' (did you mean 'mining'?)" in problems
    assert f"{path}: phases[0] (warmup): missing required key 'mining'" in problems


def test_unknown_mining_mode_lists_valid_ones(tmp_path):
    path = write(tmp_path, edit(phases=phases_with(mining="semihard")))
    problem = only(problems_of(path), "mining")
    assert problem.startswith(
        f"{path}: phases[2] (hard): mining must be one of random, semi-hard, hard-negative, "
        "batch-hard, batch-all, got 'semihard'"
    )
    assert problem.endswith("(did you mean 'semi-hard'?)")


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("steps", 0, "steps must be a positive integer, got 0"),
        ("steps", -5, "steps must be a positive integer, got -5"),
        ("steps", True, "steps must be a positive integer, got true"),
        ("steps", 2.5, "steps must be a positive integer, got 2.5"),
        ("margin", 0, "margin must be a positive number, got 0"),
        ("margin", -0.1, "margin must be a positive number, got -0.1"),
        ("batch_size", 0, "batch_size must be a positive integer, got 0"),
        ("batch_size", "64", "batch_size must be a positive integer, got '64'"),
        ("chunk_size", 0, "chunk_size must be a positive integer or 'auto', got 0"),
        ("chunk_size", "max", "chunk_size must be a positive integer or 'auto', got 'max'"),
        ("distance", "cosine", "distance must be one of euclidean, squared-euclidean, got 'cosine'"),
        ("fallback", "median", "fallback must be one of hardest, easiest, got 'median'"),
        ("on_collapse", "abort", "on_collapse must be one of warn, stop, fallback, got 'abort'"),
        ("lr", "fast", "lr must be a positive number, got 'fast'"),
        ("warmup_steps", -1, "warmup_steps must be a non-negative integer, got -1"),
        (
            "name",
            "a/b",
            "name must be a name of at most 64 letters, digits, '.', '_', '+' or '-' (it becomes a directory name), got 'a/b'",
        ),
    ],
)
def test_bad_phase_values_name_file_phase_and_key(tmp_path, key, value, expected):
    path = write(tmp_path, edit(phases=phases_with(**{key: value})))
    label = "phases[2] (hard)" if key != "name" else "phases[2]"  # an invalid name is not repeated
    assert problems_of(path) == [f"{path}: {label}: {expected}"]


def test_batch_size_must_split_into_whole_classes(tmp_path):
    path = write(tmp_path, edit(phases=phases_with(batch_size=1002)))
    assert problems_of(path) == [
        f"{path}: phases[2] (hard): batch_size must be a multiple of data.samples_per_class (4), got 1002"
    ]


def test_batch_size_needs_at_least_two_classes(tmp_path):
    path = write(tmp_path, edit(phases=phases_with(batch_size=4)))
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: phases[2] (hard): batch_size must hold at least 2 classes")
    assert "at least 8, got 4" in problem


def test_invalid_samples_per_class_does_not_cascade_into_batch_errors(tmp_path):
    path = write(tmp_path, edit(data={"source": "x", "samples_per_class": 1}))
    assert problems_of(path) == [f"{path}: data.samples_per_class must be an integer >= 2, got 1"]


@pytest.mark.parametrize(
    "phases, expected",
    [
        ([], "phases must be a non-empty list of phases, got []"),
        ("warmup", "phases must be a non-empty list of phases, got 'warmup'"),
    ],
)
def test_empty_phase_list(tmp_path, phases, expected):
    path = write(tmp_path, edit(phases=phases))
    assert problems_of(path) == [f"{path}: {expected}"]


def test_missing_phase_list(tmp_path):
    path = write(tmp_path, edit(phases=None))
    assert problems_of(path) == [f"{path}: missing required key 'phases' (a non-empty list of phases)"]


def test_phase_that_is_not_a_mapping(tmp_path):
    phases = yaml.safe_load(MINIMAL)["phases"] + ["oops"]
    [problem] = problems_of(write(tmp_path, edit(phases=phases)))
    assert "phases[3]: must be a mapping with name, mining, batch_size and steps, got 'oops'" in problem


def test_missing_phase_keys(tmp_path):
    path = write(tmp_path, edit(phases=[{"name": "only-a-name"}]))
    problems = problems_of(path)
    for key in ("mining", "batch_size", "steps"):
        assert f"{path}: phases[0] (only-a-name): missing required key '{key}'" in problems


def test_duplicate_phase_names(tmp_path):
    path = write(tmp_path, edit(phases=phases_with(name="easy")))
    assert problems_of(path) == [f"{path}: phases[2] (easy): duplicate phase name 'easy' (also phases[1])"]


def test_unknown_top_level_and_block_keys(tmp_path):
    path = write(tmp_path, MINIMAL + "evl: {}\ntrain:\n  lrr: 1.0\n  sead: 3\n  gizmo: 1\n")
    problems = problems_of(path)
    assert f"{path}: unknown key 'evl' (did you mean 'eval'?)" in problems
    assert f"{path}: unknown key 'train.lrr' (did you mean 'train.lr'?)" in problems
    assert f"{path}: unknown key 'train.sead' (did you mean 'train.seed'?)" in problems
    assert f"{path}: unknown key 'train.gizmo'" in problems


def test_missing_required_blocks(tmp_path):
    path = write(tmp_path, edit(model=None, data=None))
    problems = problems_of(path)
    assert f"{path}: missing required key 'model.name'" in problems
    assert f"{path}: missing required key 'data.source'" in problems


@pytest.mark.parametrize(
    "block, key, value, expected",
    [
        ("train", "lr", "fast", "train.lr must be a positive number, got 'fast'"),
        ("train", "lr", True, "train.lr must be a positive number, got true"),
        ("train", "seed", True, "train.seed must be an integer from 0 to 4294967295, got true"),
        ("train", "compile", "yes please", "train.compile must be true, false or 'auto', got 'yes please'"),
        ("train", "keep_graphs", "auto", "train.keep_graphs must be true or false, got 'auto'"),
        (
            "train",
            "precision",
            "fp16",
            "train.precision must be one of auto, fp32, bf16, got 'fp16' (did you mean 'bf16'?)",
        ),
        (
            "train",
            "decay",
            "cosin",
            "train.decay must be one of none, linear, cosine, got 'cosin' (did you mean 'cosine'?)",
        ),
        ("train", "device", "mps", "train.device must be one of auto, cpu, cuda, got 'mps'"),
        ("train", "optimizer", "sgd", "train.optimizer must be one of adamw, got 'sgd'"),
        ("train", "grad_clip", -1, "train.grad_clip must be a non-negative number, got -1"),
        ("train", "output_dir", "", "train.output_dir must be a non-empty string, got ''"),
        ("model", "pooling", "max", "model.pooling must be one of mean, cls, got 'max'"),
        ("model", "init", "random", "model.init must be one of pretrained, config, got 'random'"),
        (
            "model",
            "head",
            [256, 0],
            "model.head must be a list of positive integers (layer sizes), e.g. [256, 128], got [256, 0]",
        ),
        ("model", "normalize", 1, "model.normalize must be true or false, got 1"),
        (
            "data",
            "layout",
            "labeled",
            "data.layout must be one of labelled, pairs, triplets, got 'labeled' (did you mean 'labelled'?)",
        ),
        (
            "data",
            "format",
            "jsonl",
            "data.format must be one of json, parquet, csv, text or null, got 'jsonl' (did you mean 'json'?)",
        ),
        ("data", "tokenizer_workers", -1, "data.tokenizer_workers must be a non-negative integer, got -1"),
        (
            "data",
            "load_dataset",
            ["name"],
            "data.load_dataset must be a mapping of keyword arguments for datasets.load_dataset, got ['name']",
        ),
        (
            "data",
            "load_dataset",
            {"split": "x"},
            "data.load_dataset must be free of 'split', which is set by data.split, got {'split': 'x'}",
        ),
    ],
)
def test_bad_block_values(tmp_path, block, key, value, expected):
    tree = yaml.safe_load(MINIMAL)
    tree.setdefault(block, {})[key] = value
    path = write(tmp_path, yaml.safe_dump(tree))
    assert problems_of(path) == [f"{path}: {expected}"]


def test_pairs_layout_requires_two_samples_per_class(tmp_path):
    path = write(tmp_path, edit(data={"source": "x", "layout": "pairs"}))
    [problem] = problems_of(path)
    assert problem == (
        f"{path}: data.samples_per_class must be 2 when data.layout is pairs (each pair is its own class), got 4"
    )
    load_curriculum(write(tmp_path, edit(data={"source": "x", "layout": "pairs", "samples_per_class": 2})))


def test_text_format_needs_a_label_mapping_and_vice_versa(tmp_path):
    path = write(
        tmp_path,
        edit(data={"source": "./pos/*.txt", "format": "text"}, eval={"source": {"a": "./a/*.txt"}, "format": "json"}),
    )
    problems = problems_of(path)
    only(problems, "data.source must be a {label: glob} mapping when data.format is text")
    only(problems, "eval.source is a {label: glob} mapping, which needs eval.format: text, got 'json'")


def test_a_label_mapping_implies_the_text_format(tmp_path):
    # docs/data.md: "format: text  # optional: a mapping implies it"
    c = load_curriculum(
        write(tmp_path, edit(data={"source": {"a": "./a/*.txt", "b": "./b.txt"}}, eval={"source": {"a": "./a/*.txt"}}))
    )
    assert c.data.format == "text" and c.eval is not None and c.eval.format == "text"
    assert c.data.source == {"a": str(tmp_path / "a" / "*.txt"), "b": str(tmp_path / "b.txt")}


@pytest.mark.parametrize("name", ["x" * 300, "a\x00b", "two\nlines", "tab\there", "a b", "..", "\u00fc", "a/b"])
def test_phase_names_are_short_and_safe_for_a_directory(tmp_path, name):
    path = tmp_path / "curriculum.yaml"
    path.write_text(edit(phases=phases_with(name=name)))  # safe_dump escapes NUL and newline
    assert yaml.safe_load(path.read_text())["phases"][2]["name"] == name
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: phases[2]: name must be a name of at most 64 letters")
    assert "\n" not in problem and "\x00" not in problem and len(problem) < 400


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


def _alias_bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nmodel: {{name: *a{levels - 1}}}\n"


@pytest.mark.parametrize("levels", [6, 10])
def test_yaml_alias_bombs_are_refused_fast_without_printing_the_value(tmp_path, levels):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(levels))
    started = time.perf_counter()
    [problem] = problems_of(path)
    assert time.perf_counter() - started < 2.0
    assert "expands (through &anchors and *aliases) to more than 100,000 values" in problem
    assert "lol" not in problem


def test_yaml_alias_bomb_in_an_override_is_refused(tmp_path):
    path = write(tmp_path, MINIMAL)
    value = "[" + ", ".join(["&a [" + ", ".join(["x"] * 400) + "]"] + ["*a"] * 300) + "]"
    override = f"model.head={value}"
    [problem] = problems_of(path, [override])
    assert "expands (through &anchors and *aliases)" in problem
    assert len(problem) < len(override) + 300  # the override as typed, never its expansion


@pytest.mark.parametrize(
    "text",
    [
        "model: " + "[" * 5000 + "]" * 5000 + "\n",
        "model:\n" + "".join("  " * i + "- \n" for i in range(1, 3000)),
        "model: &a [*a]\n",
    ],
)
def test_deep_or_recursive_yaml_is_one_problem_not_a_recursion_error(tmp_path, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: ") and ("levels deep" in problem or "contains it" in problem)


def test_max_buffered_rows_must_fit_the_largest_batch(tmp_path):
    path = write(tmp_path, edit(data={"source": "x", "max_buffered_rows": 32}))
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: data.max_buffered_rows must be at least the largest phase batch_size (64)")


def test_eval_block_requires_a_source(tmp_path):
    path = write(tmp_path, edit(eval={"every": 10}))
    assert problems_of(path) == [f"{path}: missing required key 'eval.source'"]


def test_duplicate_yaml_keys_are_reported_with_their_line(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  lr: 1.0e-4\n  lr: 1.0e-3\n")
    assert problems_of(path) == [
        f"{path}: line {MINIMAL.count(chr(10)) + 3}: duplicate key 'lr' (YAML would silently keep only the last value)"
    ]


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


# ---------------------------------------------------------------- overrides


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


# ---------------------------------------------------------------- paths


def test_relative_paths_in_the_file_resolve_against_its_directory(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = write(
        folder,
        edit(
            model={"name": "./models/bert", "tokenizer": "../tok"},
            data={"source": "./corpus/*.parquet"},
            eval={"source": {"a": "./a/*.txt", "b": "/abs/b/*.txt"}, "format": "text"},
            train={"output_dir": "./runs/x"},
        ),
    )
    monkeypatch.chdir(tmp_path / "..")
    c = load_curriculum(path)
    assert c.model.name == str(folder / "models" / "bert")
    assert c.model.tokenizer == str(tmp_path / "tok")
    assert c.data.source == str(folder / "corpus" / "*.parquet")
    assert c.eval.source == {"a": str(folder / "a" / "*.txt"), "b": "/abs/b/*.txt"}
    assert c.train.output_dir == "./runs/x"  # stays relative to the current directory


def test_relative_paths_in_overrides_resolve_against_the_current_directory(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = write(folder, MINIMAL)
    monkeypatch.chdir(tmp_path)
    c = load_curriculum(path, ["data.source=./corpus/*.parquet", "model.name=../models/m"])
    assert c.data.source == str(tmp_path / "corpus" / "*.parquet")
    assert c.model.name == str(tmp_path.parent / "models" / "m")


def test_hub_names_are_left_untouched(tmp_path):
    c = load_curriculum(
        write(tmp_path, edit(model={"name": "bert-base-uncased", "tokenizer": "org/tok"}, data={"source": "org/name"}))
    )
    assert (c.model.name, c.model.tokenizer, c.data.source) == ("bert-base-uncased", "org/tok", "org/name")


def test_glob_override_that_yaml_cannot_parse_is_taken_as_text(tmp_path):
    c = load_curriculum(write(tmp_path, MINIMAL), ["data.source=*.parquet"])
    assert c.data.source == "*.parquet"


# ---------------------------------------------------------------- round trip and table


@pytest.mark.parametrize("source", ["quickstart", "facenet", "overridden"])
def test_round_trip_through_yaml(tmp_path, source):
    if source == "quickstart":
        original = load_curriculum(QUICKSTART)
    elif source == "facenet":
        original = load_curriculum(FACENET)
    else:
        original = load_curriculum(
            FACENET,
            [
                "model.head=[]",
                "eval.source={a: ./a/*.txt}",
                "eval.format=text",
                "eval.layout=labelled",
                "data.load_dataset.revision=main",
                "phases.1.lr=1e-6",
            ],
        )
    dumped = yaml.safe_dump(curriculum_to_dict(original), sort_keys=False)
    elsewhere = tmp_path / "deeper" / "as-run.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text(dumped)
    again = load_curriculum(elsewhere)
    assert again == original
    assert isinstance(again, Curriculum) and again.path == str(elsewhere)


def test_every_key_is_documented_in_its_section_of_curricula_md():
    """A key is declared once, on its dataclass field; the house rule is that it is documented too."""
    text = (REPO / "docs" / "curricula.md").read_text()
    sections = dict(re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    blocks = [
        ("`model`", ModelConfig),
        ("`data`", DataConfig),
        ("`train`", TrainConfig),
        ("`phases`", PhaseConfig),
        ("Ending a phase early: `until`", UntilConfig),
        ("Ending a phase early: `until`", Plateau),
        ("`eval` (optional)", EvalConfig),
    ]
    for title, cls in blocks:
        missing = [f.name for f in dataclasses.fields(cls) if f"`{f.name}`" not in sections[title]]
        assert not missing, (title, missing)


def test_loading_a_curriculum_never_imports_torch():
    """`validate` reads and prints a curriculum: it must not pay for torch (or transformers) start-up."""
    code = (
        "import sys, tripletctl.config.validate, tripletctl.config.plan; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_curriculum_to_dict_is_plain(tmp_path):
    result = curriculum_to_dict(load_curriculum(QUICKSTART))
    assert set(result) == {"model", "data", "train", "phases", "eval"}
    assert result["model"]["head"] == [64] and isinstance(result["phases"], list)
    assert "path" not in result
    yaml.safe_dump(result)  # no tuples or other non-YAML types


# ---------------------------------------------------------------- CLI


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


# ---------------------------------------------------------------- until: phase end conditions


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


# ---------------------------------------------------------------- sources and layouts


def test_data_and_eval_blocks_are_one_source_config(tmp_path):
    from tripletctl.config.blocks import SourceConfig

    text = MINIMAL + (
        "eval:\n  source: org/heldout\n  layout: triplets\n  negative_columns: [negative_1, negative_2]\n"
        "  load_dataset: {name: triplet}\n"
    )
    c = load_curriculum(write(tmp_path, text))
    assert isinstance(c.data, SourceConfig) and isinstance(c.eval, SourceConfig)
    source_keys = [f.name for f in dataclasses.fields(SourceConfig)]
    assert [f.name for f in dataclasses.fields(DataConfig)][: len(source_keys)] == source_keys
    assert [f.name for f in dataclasses.fields(EvalConfig)][: len(source_keys)] == source_keys
    assert c.eval.columns == ("anchor", "positive", "negative_1", "negative_2")
    assert c.eval.load_dataset == {"name": "triplet"}
    assert load_curriculum(write(tmp_path, yaml.safe_dump(curriculum_to_dict(c)), "again.yaml")) == c


def test_cli_source_options_map_one_to_one_onto_source_config():
    from tripletctl.cli import SOURCE_OPTIONS
    from tripletctl.config.blocks import SourceConfig

    assert list(SOURCE_OPTIONS) == [f.name for f in dataclasses.fields(SourceConfig)]


def test_source_from_options(tmp_path):
    from tripletctl.cli import SOURCE_OPTIONS
    from tripletctl.config.blocks import SourceConfig
    from tripletctl.config.validate import source_from_options

    given = {
        "source": "sentence-transformers/all-nli",
        "layout": "triplets",
        "split": "test",
        "negative_columns": ["negative"],
        "load_dataset": ["name=triplet", "revision=main", "streaming_x=3"],
    }
    source = source_from_options(given, SOURCE_OPTIONS)
    assert source == SourceConfig(
        source="sentence-transformers/all-nli",
        layout="triplets",
        split="test",
        negative_columns=("negative",),
        load_dataset={"name": "triplet", "revision": "main", "streaming_x": 3},
    )
    base = SourceConfig(source="a.jsonl", layout="pairs", load_dataset={"name": "pair"})
    changed = source_from_options({"split": "dev", "load_dataset": ["revision=v1"]}, SOURCE_OPTIONS, base=base)
    assert changed == SourceConfig(
        source="a.jsonl", layout="pairs", split="dev", load_dataset={"name": "pair", "revision": "v1"}
    )
    with pytest.raises(ConfigError) as caught:
        source_from_options(
            {"source": "x.jsonl", "layout": "pair", "format": "text", "anchor_column": "a", "positive_column": "a"},
            SOURCE_OPTIONS,
        )
    problems = caught.value.problems
    assert all(p.startswith("command line: ") and "\n" not in p for p in problems)
    assert any(
        "--layout must be one of labelled, pairs, triplets, got 'pair' (did you mean 'pairs'?)" in p for p in problems
    )
    assert any("--data must be a {label: glob} mapping when --format is text" in p for p in problems)
    with pytest.raises(ConfigError) as caught:
        source_from_options(
            {"source": "x.jsonl", "layout": "pairs", "anchor_column": "a", "positive_column": "a"}, SOURCE_OPTIONS
        )
    assert caught.value.problems == [
        "command line: the pairs columns must be distinct, but 'a' is named twice "
        "among --anchor-column, --positive-column"
    ]


def test_triplets_layout_batch_sizes_count_texts_of_whole_groups(tmp_path):
    data = {
        "source": "org/triplets",
        "layout": "triplets",
        "samples_per_class": 2,
        "negative_columns": ["negative_1", "negative_2", "negative_3"],
    }
    phases = [
        {"name": "a", "mining": "semi-hard", "batch_size": 10, "steps": 1},
        {"name": "b", "mining": "batch-all", "batch_size": 12, "steps": 1},
        {"name": "c", "mining": "batch-hard", "batch_size": 5, "steps": 1},
    ]
    path = write(tmp_path, edit(data=data, phases=phases))
    assert problems_of(path) == [
        f"{path}: phases[1] (b): batch_size must be a multiple of the rows of one triplet group "
        "(anchor, positive and 3 negatives) (5), got 12",
        f"{path}: phases[2] (c): batch_size must hold at least 2 classes of the rows of one triplet group "
        "(anchor, positive and 3 negatives) (5) rows, i.e. be at least 10, got 5",
    ]
    c = load_curriculum(path, ["phases.1.batch_size=15", "phases.2.batch_size=20"])
    assert c.data.rows_per_group == 5 and c.data.columns[2:] == ("negative_1", "negative_2", "negative_3")
    console = Console(record=True, width=160)
    console.print(plan_table(c))
    text = console.export_text()
    assert "anchor, positive and 3 negatives, 5 texts" in " ".join(text.split())
    header = next(line for line in text.splitlines() if "groups" in line).split()
    rows = [line.split() for line in text.splitlines() if line.split()[:2] in (["0", "a"], ["2", "c"])]
    assert [row[header.index("groups")] for row in rows] == ["2", "4"]


@pytest.mark.parametrize(
    "data, fragment",
    [
        (
            {"layout": "triplets"},
            "data.samples_per_class must be 2 when data.layout is triplets "
            "(each row's anchor and positive are its class), got 4",
        ),
        (
            {"layout": "triplets", "samples_per_class": 2, "negative_columns": []},
            "data.negative_columns must be a non-empty list of distinct column names",
        ),
        (
            {"layout": "triplets", "samples_per_class": 2, "negative_columns": ["n", "n"]},
            "data.negative_columns must be a non-empty list of distinct column names",
        ),
        (
            {"layout": "triplets", "samples_per_class": 2, "negative_columns": ["anchor"]},
            "the triplets columns must be distinct, but 'anchor' is named twice among data.anchor_column, "
            "data.positive_column, data.negative_columns",
        ),
        (
            {"layout": "triplets", "format": "text", "source": {"a": "x.txt"}},
            "data.layout must be labelled when data.format is text, got 'triplets'",
        ),
    ],
)
def test_triplets_layout_problems(tmp_path, data, fragment):
    path = write(tmp_path, edit(data={"source": "org/triplets", **data}))
    only(problems_of(path), fragment)


def test_facenet_triplets_validates_offline():
    c = load_curriculum(REPO / "curricula" / "facenet-triplets.yaml")
    assert c.data.layout == c.eval.layout == "triplets"
    assert c.data.load_dataset == c.eval.load_dataset == {"name": "triplet"}
    assert [p.batch_size // c.data.rows_per_group for p in c.phases] == [166, 333, 666]
    result = CliRunner().invoke(app, ["validate", str(REPO / "curricula" / "facenet-triplets.yaml")])
    assert result.exit_code == 0, result.output


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
