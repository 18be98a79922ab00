"""The README's main job, end to end through the real CLI: the built-in quickstart trains, beats the
untrained model on held-out retrieval, the trained model is judged healthy, not collapsed, loads in
sentence-transformers with tripletctl's own embeddings, and exports (latest or best) for the hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import QUICKSTART, REPO

pytestmark = pytest.mark.slow  # end to end: the real CLI, subprocesses, several processes or faults

HELDOUT = REPO / "curricula" / "quickstart" / "heldout.jsonl"


def tripletctl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "tripletctl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("quickstart")
    result = tripletctl(
        "train",
        str(QUICKSTART),
        f"train.output_dir={work / 'run'}",
        "train.keep_best=recall@1",
        "eval.every=40",
        cwd=work,
    )
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
    result = tripletctl(
        "inspect-collapse", str(quickstart_run), "--data", str(HELDOUT), "--plot", str(picture), "--json", cwd=tmp_path
    )
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


def heldout_texts(limit: int = 200) -> list[str]:
    return [json.loads(line)["text"] for line in HELDOUT.read_text().splitlines()[:limit]]


def ours_and_sentence_transformers(model_dir: Path, texts: list[str]):
    from sentence_transformers import SentenceTransformer

    from tripletctl.model.encoder import encode, load_model

    model, tokenizer = load_model(model_dir)
    ours = encode(model, tokenizer, texts, max_length=32)
    theirs = torch.as_tensor(SentenceTransformer(str(model_dir), device="cpu").encode(texts))
    return ours, theirs


def test_sentence_transformers_gives_tripletctl_s_embeddings(quickstart_run):
    """The README's `SentenceTransformer(...)` line on the quickstart's output."""
    ours, theirs = ours_and_sentence_transformers(
        quickstart_run / "phase-2-batch-hard" / "checkpoint" / "model", heldout_texts()
    )
    assert abs(theirs - ours).max() <= 1e-5
    torch.testing.assert_close(theirs.norm(dim=1), torch.ones(len(theirs)))


def test_keep_best_keeps_the_best_eval(quickstart_run, tmp_path):
    evals = [
        json.loads(line)
        for path in sorted(quickstart_run.glob("phase-*/metrics.jsonl"))
        for line in path.read_text().splitlines()
        if '"event": "eval"' in line
    ]
    assert len(evals) == 4  # phase 0 at steps 40 and 80, phases 1 and 2 at their ends
    kept = json.loads((quickstart_run / "best" / "best.json").read_text())
    winner = max(evals, key=lambda e: (e["recall@1"], -e["global_step"]))
    assert kept["value"] == winner["recall@1"] and kept["global_step"] == winner["global_step"]
    assert json.loads((quickstart_run / "run.json").read_text())["best"] == kept
    result = tripletctl("eval", str(quickstart_run / "best"), "--data", str(HELDOUT), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["recall@1"] == pytest.approx(kept["value"], abs=1e-6)


@pytest.mark.parametrize("best", [False, True])
def test_export_for_the_hub(quickstart_run, tmp_path, best):
    out = tmp_path / "quickstart-model"
    result = tripletctl("export", str(quickstart_run), str(out), *(["--best"] if best else []), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hf upload" in result.stdout
    source = quickstart_run / ("best" if best else "phase-2-batch-hard/checkpoint") / "model"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in source.iterdir())
    assert not (out / "optimizer.pt").exists() and not (out / "COMPLETE").exists()
    ours, _ = ours_and_sentence_transformers(source, heldout_texts())
    _, theirs = ours_and_sentence_transformers(out, heldout_texts())
    assert abs(theirs - ours).max() <= 1e-5
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\n") and "| recall@1 |" in card

    again = tripletctl("export", str(quickstart_run), str(out), cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
