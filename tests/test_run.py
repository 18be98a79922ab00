"""train/run.py: what is checked before anything is written, and the held-out evals a run prints (in a
log file and above the bar on a terminal)."""

from __future__ import annotations

import io
import re

import pytest
import yaml
from conftest import ASSETS, REPO, TINY_BERT
from rich.console import Console

import tripletctl
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
