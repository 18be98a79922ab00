"""The exit codes of `train` are declared once (core/exit_codes.py): the README holds exactly the
table generated from them, once, and `train --help` shows the same codes and meanings."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.core.exit_codes import TRAIN_EXIT_CODES, help_table, markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_has_one_exit_code_table_and_it_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    assert text.count(markdown_table()) == 1, "README.md must hold markdown_table() verbatim"
    assert text.count("| code | meaning |") == 1, "a second exit-code table in README.md"


def test_train_help_shows_every_code_and_its_meaning():
    result = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())  # rich wraps long lines
    for line in help_table().splitlines():
        assert " ".join(line.split()) in shown, line
    assert len(help_table().splitlines()) == len(TRAIN_EXIT_CODES)
