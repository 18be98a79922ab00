"""`tripletctl inspect-collapse` (commands/collapse_command.py): the verdict's exit code (3 on a
collapsed checkpoint), the picture, JSON, and a bad checkpoint as exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import QUICKSTART_HELDOUT as HELDOUT
from helpers import make_collapsed, tiny_encoder

from tripletctl.evaluation.collapse import COLLAPSED, EXIT_CODES


@pytest.fixture
def checkpoint_factory(tmp_path, tiny_bert_dir):
    def make(collapsed: bool) -> Path:
        from tripletctl.outputs.checkpoint_save import save_checkpoint

        model, tokenizer = tiny_encoder(tiny_bert_dir)
        if collapsed:
            make_collapsed(model)
        run = tmp_path / ("collapsed-run" if collapsed else "run")
        curriculum = {"data": {"max_length": 32}, "phases": [{"name": "batch-hard", "margin": 0.2}]}
        return save_checkpoint(
            run / "phase-0-batch-hard" / "checkpoint",
            model=model,
            tokenizer=tokenizer,
            optimizer=None,
            state={"phase_index": 0, "step": 1, "global_step": 1},
            stream_state=None,
            curriculum=curriculum,
        )

    return make


@pytest.fixture
def heldout_file(tmp_path) -> Path:
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(HELDOUT.read_text().splitlines()[:96]) + "\n")
    return path


@pytest.mark.slow
def test_cli_exit_code_3_on_a_collapsed_checkpoint(checkpoint_factory, heldout_file, tmp_path):
    from typer.testing import CliRunner

    from tripletctl.cli import app

    ckpt = checkpoint_factory(collapsed=True)
    png = tmp_path / "collapse.png"
    result = CliRunner().invoke(
        app,
        [
            "inspect-collapse",
            str(ckpt.parent.parent),
            "--data",
            str(heldout_file),
            "--plot",
            str(png),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 3, result.output
    assert "collapsed" in result.output and png.is_file()

    result = CliRunner().invoke(app, ["inspect-collapse", str(ckpt), "--data", str(heldout_file), "--json"])
    assert result.exit_code == 3, result.output
    payload = json.loads(result.stdout)
    assert payload["verdict"] == COLLAPSED and payload["rows"] == 96


@pytest.mark.slow
def test_cli_untrained_checkpoint_exit_code_matches_verdict(checkpoint_factory, heldout_file):
    from typer.testing import CliRunner

    from tripletctl.cli import app

    ckpt = checkpoint_factory(collapsed=False)
    result = CliRunner().invoke(app, ["inspect-collapse", str(ckpt), "--data", str(heldout_file), "--json"])
    payload = json.loads(result.stdout)
    assert result.exit_code == EXIT_CODES[payload["verdict"]]


def test_cli_bad_checkpoint_is_exit_2(tmp_path, heldout_file):
    from typer.testing import CliRunner

    from tripletctl.cli import app

    result = CliRunner().invoke(app, ["inspect-collapse", str(tmp_path / "nope"), "--data", str(heldout_file)])
    assert result.exit_code == 2
