"""train/run.py: what is checked before anything is written, the held-out evals a run prints (in a
log file and above the bar on a terminal), and `tripletctl train` end to end on the tiny BERT and
small local files: every phase in order, the outputs it writes, every triplet file variant."""

from __future__ import annotations

import io
import json
import math
import re

import pytest
import yaml
from helpers import ASSETS, QUICKSTART_DATA, REPO, TINY_BERT, write_curriculum
from rich.console import Console
from typer.testing import CliRunner

import tripletctl
from tripletctl.cli import app
from tripletctl.config.validate import load_curriculum
from tripletctl.core.errors import DataError
from tripletctl.train.run import train as run_training


def _curriculum(tmp_path, eval_block: dict) -> str:
    spec = {
        "model": {"name": str(TINY_BERT), "init": "config", "head": [16]},
        "data": {
            "source": str(REPO / "curricula" / "quickstart" / "train.jsonl"),
            "max_length": 16,
            "shuffle_buffer": 64,
            "tokenizer_workers": 0,
        },  # fmt: skip
        "train": {"lr": 1e-3, "warmup_steps": 1, "output_dir": str(tmp_path / "run"), "device": "cpu"},
        "phases": [
            {"name": "semi-hard", "mining": "semi-hard", "batch_size": 16, "steps": 3},
            {"name": "hard", "mining": "hard-negative", "batch_size": 32, "steps": 2},
        ],
        "eval": eval_block,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_a_wrong_eval_column_stops_before_anything_is_written(tmp_path):
    """Issue 36, item 9: a failed eval-block column check left curriculum.yaml and .tripletctl.lock in a
    new run directory. Loaded without the header check (a hub source would not be read there)."""
    plan = load_curriculum(_curriculum(tmp_path, {"source": str(ASSETS / "wrong_columns.jsonl")}))
    with pytest.raises(DataError, match="columns 'text', 'label' not found; available columns: body, topic"):
        run_training(plan, console=Console(file=io.StringIO()))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_every_held_out_eval_is_a_line_above_the_bar_on_a_terminal(tmp_path):
    """Issue 36, item 3: phase-end and eval.every evals reached only summary.json and metrics.jsonl,
    and the untrained eval before step 1 was silent."""
    held_out = {"source": str(REPO / "curricula" / "quickstart" / "heldout.jsonl"), "max_rows": 96, "every": 2}
    out = io.StringIO()
    result = tripletctl.train(
        _curriculum(tmp_path, held_out), console=Console(file=out, force_terminal=True, width=200)
    )
    assert result.exit_code == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue()).replace("\r", "\n")  # the bar's redraws
    said = [
        line.split(":")[0] for line in text.splitlines() if line.startswith(("held-out untrained", "held-out phase"))
    ]
    assert said == [
        "held-out untrained",
        "held-out phase 0 semi-hard step 2/3",
        "held-out phase 0 semi-hard step 3/3",
        "held-out phase 1 hard step 2/2",
    ]
    assert text.index("evaluating the untrained model on 96 held-out texts ...") < text.index("held-out untrained")
    assert f"recall@1 {result.eval_untrained['recall@1']:.4f}" in text
    assert f"map@r {result.eval_final['map@r']:.4f}" in text.split("held-out phase 1 hard step 2/2")[1]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_train_runs_all_phases_and_writes_outputs(tmp_path, fmt):
    source = QUICKSTART_DATA
    if fmt == "parquet":
        import pyarrow.json as pj
        import pyarrow.parquet as pq

        source = tmp_path / "train.parquet"
        pq.write_table(pj.read_json(QUICKSTART_DATA), source)
    path = write_curriculum(tmp_path, source=source)
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    index = json.loads((run / "run.json").read_text())
    assert [p["status"] for p in index["phases"]] == ["done", "done", "done"]
    assert [p["dir"] for p in index["phases"]] == ["phase-0-semi-hard", "phase-1-hard-negative", "phase-2-batch-hard"]
    for phase, steps, batch in zip(index["phases"], (4, 3, 3), (16, 32, 64)):
        records = [json.loads(line) for line in (run / phase["dir"] / "metrics.jsonl").read_text().splitlines()]
        step_records = [r for r in records if "event" not in r]
        assert [r["step"] for r in step_records] == list(range(1, steps + 1))
        for r in step_records:
            assert r["mining"] == phase["mining"]
            for key in ("loss", "batch_hard_loss", "active_fraction", "mean_ap", "mean_an", "embedding_spread"):
                assert math.isfinite(r[key]), key
            # the batch-hard loss is the hardest: never below the mined loss of the same batch
            assert r["batch_hard_loss"] >= r["loss"] - 1e-6
        summary = json.loads((run / phase["dir"] / "summary.json").read_text())
        assert summary["steps_done"] == steps and summary["batch_size"] == batch
        assert (run / phase["dir"] / "checkpoint" / "COMPLETE").exists()
    # the encoder loads in plain transformers
    from transformers import AutoModel

    AutoModel.from_pretrained(run / "phase-2-batch-hard" / "checkpoint" / "model")


TRIPLET_RUNS = [  # every file variant trains; the mining modes rotate over them (test_mining checks each
    # mode on triplet batches against the brute force)
    ("jsonl", 1, "semi-hard"),
    ("parquet", 1, "hard-negative"),
    ("csv", 1, "batch-hard"),
    ("jsonl", 3, "batch-all"),
    ("parquet", 3, "random"),
    ("csv", 3, "semi-hard"),
]


@pytest.mark.slow
@pytest.mark.parametrize("ext, negatives, mode", TRIPLET_RUNS)
def test_triplet_files_train_end_to_end(tmp_path, ext, negatives, mode):

    names = ["negative"] if negatives == 1 else [f"negative_{j + 1}" for j in range(negatives)]
    group = 2 + negatives
    spec = {
        "model": {"name": str(TINY_BERT), "init": "config", "pooling": "mean", "head": [16]},
        "data": {
            "source": str(ASSETS / f"{'triplets' if negatives == 1 else 'triplets3'}.{ext}"),
            "layout": "triplets",
            "negative_columns": names,
            "samples_per_class": 2,
            "shuffle_buffer": 64,
            "max_length": 16,
            "tokenizer_workers": 0,
        },
        "train": {
            "lr": 1e-3,
            "warmup_steps": 1,
            "seed": 3,
            "output_dir": str(tmp_path / "run"),
            "device": "cpu",
            "chunk_size": 16,
        },
        "phases": [{"name": mode, "mining": mode, "batch_size": 6 * group, "steps": 2}],
        "eval": {"source": str(ASSETS / "triplets_heldout.jsonl"), "layout": "triplets", "max_rows": 60},
    }
    path = tmp_path / "curriculum.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    index = json.loads((run / "run.json").read_text())
    assert [p["status"] for p in index["phases"]] == ["done"]
    records = [
        json.loads(line) for line in (run / index["phases"][0]["dir"] / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert math.isfinite(r["loss"]) and r["mining"] == mode
        assert r["skipped_anchors"] == 6 * negatives  # the given negatives, never anchors
    final = index["eval_final"]
    assert final["rows"] == 60 and final["given_triplets"] == 20 and 0 <= final["given_negative_accuracy"] <= 1
