"""The phases list (tripletctl/config/phase_checks.py), through `load_curriculum`: every problem names
the file, the phase and the key; phases take the train block's keys unless they set their own; batch
sizes hold whole classes or triplet groups; names are unique and safe for a directory."""

from __future__ import annotations

import pytest
import yaml
from helpers import MINIMAL, edit, only, phases_with, problems_of, write
from rich.console import Console

from tripletctl.config.plan import plan_table
from tripletctl.config.validate import load_curriculum
from tripletctl.core.errors import ConfigError


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


@pytest.mark.parametrize("name", ["x" * 300, "a\x00b", "two\nlines", "tab\there", "a b", "..", "\u00fc", "a/b"])
def test_phase_names_are_short_and_safe_for_a_directory(tmp_path, name):
    path = tmp_path / "curriculum.yaml"
    path.write_text(edit(phases=phases_with(name=name)))  # safe_dump escapes NUL and newline
    assert yaml.safe_load(path.read_text())["phases"][2]["name"] == name
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: phases[2]: name must be a name of at most 64 letters")
    assert "\n" not in problem and "\x00" not in problem and len(problem) < 400


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


def test_neighbour_batches_are_off_by_default_and_keys_reach_the_phase(tmp_path):
    c = load_curriculum(write(tmp_path, edit(phases=phases_with(batch_classes="neighbours", neighbour_group=3))))
    assert [p.batch_classes for p in c.phases] == ["random", "random", "neighbours"]
    assert (c.phases[2].neighbour_share, c.phases[2].neighbour_group, c.data.neighbour_refresh) == (0.5, 3, 20)


def test_neighbour_group_must_fit_the_classes_of_a_batch(tmp_path):
    # hard: batch_size 64 / samples_per_class 4 = 16 classes
    path = write(tmp_path, edit(phases=phases_with(batch_classes="neighbours", neighbour_group=17)))
    assert problems_of(path) == [
        f"{path}: phases[2] (hard): neighbour_group 17 must fit the 16 classes of a batch "
        "(batch_size 64 / data.samples_per_class 4); lower neighbour_group"
    ]
    assert load_curriculum(write(tmp_path, edit(phases=phases_with(batch_classes="neighbours", neighbour_group=16))))


def test_neighbour_batches_are_refused_for_layouts_of_one_class_a_row(tmp_path):
    data = {"source": "org/pairs", "layout": "pairs", "samples_per_class": 2}
    path = write(tmp_path, edit(data=data, phases=phases_with(batch_classes="neighbours")))
    assert problems_of(path) == [
        f"{path}: phases[2] (hard): batch_classes neighbours needs classes of several rows; data.layout pairs "
        "makes every row its own class: use batch_classes random"
    ]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"batch_classes": "neighbors"}, "did you mean 'neighbours'"),
        ({"neighbour_share": 1.5}, "neighbour_share must be a number in (0, 1]"),
        ({"neighbour_group": 1}, "neighbour_group must be an integer >= 2"),
    ],
)
def test_neighbour_keys_are_checked(tmp_path, change, fragment):
    path = write(tmp_path, edit(phases=phases_with(**change)))
    assert fragment in only(problems_of(path), "phases[2] (hard)")
