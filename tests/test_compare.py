"""Per-query retrieval metrics against a brute-force reference, and `tripletctl compare` end to end:
a barely trained checkpoint against a trained one, a model against itself, model folders, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO, TINY_BERT

from tripletctl.core.errors import DataError
from tripletctl.evaluation.compare import compare_per_query
from tripletctl.evaluation.retrieval import per_query_metrics, retrieval_metrics

HELDOUT = REPO / "curricula" / "quickstart" / "heldout.jsonl"
METRICS = ("recall@1", "recall@5", "recall@10", "map@r", "r_precision")


def brute_force_per_query(emb: np.ndarray, labels: np.ndarray) -> tuple[list[int], dict[str, list[float]]]:
    """Each query's values straight from the definitions: an N x N matrix, Python loops, ties
    broken against the model (other-label rows first among equal distances)."""
    n = len(labels)
    d = ((emb[:, None, :].astype(np.float64) - emb[None, :, :]) ** 2).sum(-1)
    rows, out = [], {name: [] for name in METRICS}
    for i in range(n):
        others = [j for j in range(n) if j != i]
        r = sum(labels[j] == labels[i] for j in others)
        if r == 0:
            continue
        rows.append(i)
        ranked = sorted(others, key=lambda j: (d[i, j], labels[j] == labels[i], j))
        rel = [bool(labels[j] == labels[i]) for j in ranked]
        for k in (1, 5, 10):
            out[f"recall@{k}"].append(float(any(rel[:k])))
        out["r_precision"].append(sum(rel[:r]) / r)
        out["map@r"].append(sum(sum(rel[:pos]) / pos for pos in range(1, r + 1) if rel[pos - 1]) / r)
    return rows, out


def labelled_set(n: int, classes: int, seed: int, noise: float, dim: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centres = rng.normal(size=(classes, dim))
    return (centres[labels] + noise * rng.normal(size=(n, dim))).astype(np.float32), labels


@pytest.mark.parametrize("n,classes,seed,chunk", [(45, 4, 0, 8), (60, 2, 1, 7), (70, 30, 2, 1024), (33, 9, 3, 1)])
def test_per_query_values_match_brute_force_and_average_to_retrieval_metrics(n, classes, seed, chunk):
    emb, labels = labelled_set(n, classes, seed, noise=1.0)
    got = per_query_metrics(emb, labels, chunk_size=chunk)
    rows, want = brute_force_per_query(emb, labels)
    np.testing.assert_array_equal(got.query_rows, rows)
    for name in METRICS:
        np.testing.assert_allclose(got.values[name], want[name], rtol=0, atol=1e-12, err_msg=name)
    averaged = retrieval_metrics(emb, labels, chunk_size=chunk)
    assert got.rows == n and got.excluded_queries == averaged["excluded_queries"] and got.classes == averaged["classes"]
    for name in METRICS:
        assert got.means()[name] == pytest.approx(averaged[name], abs=1e-12), name
    for k in (1, 5, 10):  # hits are 0/1: their means are the same counts over the same queries
        assert got.means()[f"recall@{k}"] == averaged[f"recall@{k}"]


def test_per_query_ties_are_broken_against_the_model():
    rng = np.random.default_rng(3)
    emb = np.repeat(np.array([[0.0, 0.0], [1.0, 0.0]], dtype=np.float32), 20, axis=0)
    labels = rng.integers(0, 3, size=40)
    got = per_query_metrics(emb, labels, chunk_size=6)
    _, want = brute_force_per_query(emb, labels)
    for name in METRICS:
        np.testing.assert_allclose(got.values[name], want[name], rtol=0, atol=1e-12, err_msg=name)


def test_separated_embeddings_beat_noisy_ones_and_a_model_ties_itself():
    clean, labels = labelled_set(300, 20, 5, noise=0.3)
    rng = np.random.default_rng(6)
    noisy = clean + 1.5 * rng.normal(size=clean.shape).astype(np.float32)
    good, bad = per_query_metrics(clean, labels), per_query_metrics(noisy, labels)
    result = compare_per_query(bad, good, resamples=1000, seed=0)
    assert list(result) == list(METRICS)
    for name, entry in result.items():
        assert entry["low"] > 0 and entry["better"] == "b" and entry["verdict"] == "B is better", name
    itself = compare_per_query(good, per_query_metrics(clean.copy(), labels), resamples=1000, seed=0)
    for name, entry in itself.items():
        assert entry["diff"] == entry["low"] == entry["high"] == 0.0, name
        assert entry["verdict"] == "no detectable difference"


def test_different_rows_are_refused():
    emb, labels = labelled_set(50, 5, 0, noise=1.0)
    full, part = per_query_metrics(emb, labels), per_query_metrics(emb[:40], labels[:40])
    with pytest.raises(DataError, match="different rows"):
        compare_per_query(full, part)


# ------------------------------------------------------------------------------------ the command


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
