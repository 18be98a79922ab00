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


def test_no_other_page_lists_the_exit_codes_and_those_that_name_them_link_to_the_table():
    """Issue 23 #14: a second table (1 = collapse stop, no 3 or 4) contradicted the first one."""
    docs = README.parent / "docs"
    for page in [README, *sorted(docs.glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        rows = [line for line in text.splitlines() if line.startswith(("| 130 |", "| 4 |", "| 5 |"))]
        assert len(rows) == (3 if page == README else 0), (page.name, rows)
        if page != README and "exit codes of `train`" in text.lower():
            assert "README.md#exit-codes-of-train" in text, page.name
