"""`tripletctl compare` (commands/compare_command.py): a trained model against a barely trained one
in a real process (each side what `eval` reports), a model against itself and its exported folder,
bad input as one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import QUICKSTART_HELDOUT as HELDOUT
from helpers import REPO, TINY_BERT

METRICS = ("recall@1", "recall@5", "recall@10", "map@r", "r_precision")


def tripletctl(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "tripletctl", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def two_phase_run(tmp_path_factory) -> Path:
    """A run whose phase 0 is one step (barely trained) and phase 1 fifteen more (clearly better on
    the quickstart topics), with an eval block of 240 held-out rows."""
    work = tmp_path_factory.mktemp("compare")
    spec = {
        "model": {"name": str(TINY_BERT), "init": "config", "pooling": "mean", "head": [32]},
        "data": {
            "source": str(REPO / "curricula" / "quickstart" / "train.jsonl"),
            "shuffle_buffer": 512,
            "max_length": 24,
            "samples_per_class": 4,
            "tokenizer_workers": 0,
        },
        "train": {
            "lr": 1e-3,
            "warmup_steps": 2,
            "seed": 7,
            "output_dir": str(work / "run"),
            "checkpoint_every": 0,
            "device": "cpu",
            "chunk_size": 64,
        },
        "phases": [
            {"name": "start", "mining": "semi-hard", "batch_size": 16, "margin": 0.2, "steps": 1},
            {"name": "learn", "mining": "semi-hard", "batch_size": 48, "margin": 0.2, "steps": 15},
        ],
        "eval": {"source": str(HELDOUT), "max_rows": 240},
    }
    path = work / "curriculum.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = tripletctl("train", path, cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    return work / "run"


def _eval_json(model: Path, *args) -> dict:
    from typer.testing import CliRunner

    from tripletctl.cli import app

    result = CliRunner().invoke(app, ["eval", str(model), *map(str, args), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
def test_compare_trained_against_barely_trained_in_a_subprocess(two_phase_run, tmp_path):
    start = two_phase_run / "phase-0-start"
    result = tripletctl("compare", start, two_phase_run, "--json", "--device", "cpu", "--seed", 3, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)  # nothing but JSON on stdout; no --data: A's eval block
    assert payload["rows"] == 240 and payload["resamples"] == 2000 and payload["seed"] == 3
    assert payload["data"] == str(HELDOUT) and payload["confidence"] == 0.95
    assert payload["a"]["checkpoint"].endswith("phase-0-start/checkpoint")
    assert payload["b"]["checkpoint"].endswith("phase-1-learn/checkpoint")
    assert list(payload["metrics"]) == list(METRICS)
    for name, entry in payload["metrics"].items():
        assert 0 < entry["low"] <= entry["diff"] <= entry["high"], name
        assert entry["better"] == "b" and entry["verdict"] == "B is better"
        assert entry["diff"] == pytest.approx(entry["b"] - entry["a"], abs=1e-12)
    # each side is exactly what `tripletctl eval` reports for that model on those rows
    for side, model in (("a", start), ("b", two_phase_run)):
        alone = _eval_json(model)
        assert alone["queries"] == payload["queries"]
        for name in METRICS:
            assert payload["metrics"][name][side] == pytest.approx(alone[name], abs=1e-12), (side, name)

    table = tripletctl("compare", two_phase_run, start, "--device", "cpu", "--resamples", 1000, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("A is better") == len(METRICS) and "95% interval" in table.stdout


@pytest.mark.slow
def test_a_model_against_itself_and_model_folders(two_phase_run, tmp_path):
    from typer.testing import CliRunner

    from tripletctl.cli import app
    from tripletctl.outputs.export import export_model

    folder = tmp_path / "exported"
    export_model(two_phase_run, folder)
    args = ["compare", str(two_phase_run), str(folder), "--data", str(HELDOUT), "--max-rows", "150"]
    result = CliRunner().invoke(app, [*args, "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["rows"] == 150 and payload["b"]["checkpoint"] == str(folder)
    assert payload["a"]["max_length"] == payload["b"]["max_length"] == 24
    for name, entry in payload["metrics"].items():
        assert entry["a"] == entry["b"] and entry["diff"] == entry["low"] == entry["high"] == 0.0, name
        assert entry["better"] is None and entry["verdict"] == "no detectable difference"
    table = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert table.exit_code == 0 and table.output.count("no detectable difference") >= len(METRICS)


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(two_phase_run, tmp_path):
    from typer.testing import CliRunner

    from tripletctl.cli import app

    folder = tmp_path / "exported"
    from tripletctl.outputs.export import export_model

    export_model(two_phase_run, folder)
    run, data = str(two_phase_run), str(HELDOUT)
    cases = [
        ([run, str(tmp_path / "missing"), "--data", data], "does not exist"),
        ([str(tmp_path / "missing"), run, "--data", data], "does not exist"),
        ([str(folder), run], "is a model folder, which holds no held-out data: pass --data SOURCE"),
        ([run, run, "--resamples", "999"], "--resamples must be at least 1000, got 999"),
        ([run, run, "--batch-size", "0"], "--batch-size must be at least 1"),
        ([run, run, "--seed", "-1"], "--seed must be a non-negative integer"),
        ([run, run, "--data", data, "--layout", "tripplets"], "--layout must be one of"),
        ([run, run, "--data", str(tmp_path / "nothing.jsonl")], "nothing.jsonl"),
    ]
    for args, expected in cases:
        result = CliRunner().invoke(app, ["compare", *args, "--device", "cpu"])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], (args, result.output)
    # and in a real process: one line on stderr, no traceback, nothing on stdout
    result = tripletctl("compare", run, tmp_path / "missing", "--json", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "does not exist" in result.stderr
