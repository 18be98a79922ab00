"""Reading YAML safely (tripletctl/config/yaml_io.py): malformed files named by line, alias bombs and
deep nesting refused fast in one line, duplicate keys reported, YAML 1.1 numbers read as numbers."""

from __future__ import annotations

import time

import pytest
from helpers import MINIMAL, problems_of, write

from tripletctl.config.validate import load_curriculum


def test_yaml_exponent_without_dot_is_read_as_a_number(tmp_path):
    c = load_curriculum(write(tmp_path, MINIMAL + "train:\n  lr: 3e-5\n"))
    assert c.train.lr == 3e-5 and isinstance(c.train.lr, float)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  name: bert\ndata:\n  source: [unclosed\nphases: []\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: line ")
    assert "malformed YAML" in problem


def test_malformed_yaml_line_number_is_ones_based(tmp_path):
    path = write(tmp_path, "model:\n  name: bert\n bad: indent\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: line 3: malformed YAML: ")


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


def test_duplicate_yaml_keys_are_reported_with_their_line(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  lr: 1.0e-4\n  lr: 1.0e-3\n")
    assert problems_of(path) == [
        f"{path}: line {MINIMAL.count(chr(10)) + 3}: duplicate key 'lr' (YAML would silently keep only the last value)"
    ]
