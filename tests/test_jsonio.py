"""jsonio: strict JSON (NaN/inf -> null at any depth) and whole-file replacement."""

from __future__ import annotations

import json
import math

import pytest

from tripletctl.core.errors import OutputError
from tripletctl.core.jsonio import finite_or_null, replace_text, strict_json, write_json_atomic


def _reject_constant(name: str):
    raise ValueError(f"{name} is not strict JSON")


def _strict_loads(text: str):
    return json.loads(text, parse_constant=_reject_constant)


def test_non_finite_numbers_become_null_at_any_depth():
    value = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf, "d": (2, math.nan)}], "e": "nan", "f": 3}
    expected = {"a": None, "b": [1.0, None, {"c": None, "d": [2, None]}], "e": "nan", "f": 3}
    assert finite_or_null(value) == expected
    assert _strict_loads(strict_json(value)) == expected


def test_strict_json_writes_unknown_objects_as_text():
    class Odd:
        def __str__(self) -> str:
            return "odd"

    assert _strict_loads(strict_json({"x": Odd(), "y": 0.5})) == {"x": "odd", "y": 0.5}


def test_write_json_atomic_replaces_the_file_whole(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("old")
    write_json_atomic(path, {"loss": math.nan, "step": 3})
    assert path.read_text().endswith("\n")
    assert _strict_loads(path.read_text()) == {"loss": None, "step": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left


def test_a_refused_write_is_one_error_and_leaves_the_old_file(tmp_path):
    path = tmp_path / "missing-dir" / "run.json"
    with pytest.raises(OutputError):
        replace_text(path, "new")
    assert not path.parent.exists()
