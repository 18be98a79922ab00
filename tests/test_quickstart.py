"""The README's main job, end to end through the real CLI: the built-in quickstart trains, beats the
untrained model on held-out retrieval, and the trained model is judged healthy, not collapsed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QUICKSTART, REPO

HELDOUT = REPO / "curricula" / "quickstart" / "heldout.jsonl"


def tripletctl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "tripletctl", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("quickstart")
    result = tripletctl("train", str(QUICKSTART), f"train.output_dir={work / 'run'}", cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    return work / "run"


def test_quickstart_beats_the_untrained_model(quickstart_run):
    index = json.loads((quickstart_run / "run.json").read_text())
    assert [p["status"] for p in index["phases"]] == ["done", "done", "done"]
    assert [p["mining"] for p in index["phases"]] == ["semi-hard", "hard-negative", "batch-hard"]
    batches = [p["batch_size"] for p in index["phases"]]
    assert batches == sorted(batches) and len(set(batches)) == 3
    untrained, trained = index["eval_untrained"]["recall@1"], index["eval_final"]["recall@1"]
    assert trained >= untrained + 0.3, (untrained, trained)


def test_quickstart_model_is_healthy(quickstart_run, tmp_path):
    picture = tmp_path / "collapse.png"
    result = tripletctl("inspect-collapse", str(quickstart_run), "--data", str(HELDOUT), "--plot", str(picture),
                        "--json", cwd=tmp_path)
    report = json.loads(result.stdout)
    assert result.returncode == 0, report
    assert report["verdict"] == "healthy"
    assert picture.stat().st_size > 10_000


def test_eval_reports_the_trained_numbers(quickstart_run, tmp_path):
    result = tripletctl("eval", str(quickstart_run), "--data", str(HELDOUT), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    final = json.loads((quickstart_run / "run.json").read_text())["eval_final"]
    assert metrics["recall@1"] == pytest.approx(final["recall@1"], abs=1e-6)
    assert 0.0 < metrics["map@r"] <= 1.0 and metrics["rows"] == 1200


def test_plot_draws_the_run(quickstart_run, tmp_path):
    out = tmp_path / "run.png"
    result = tripletctl("plot", str(quickstart_run), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
