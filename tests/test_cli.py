"""CLI conventions: --version, shell completion, validate --json, tables through a pipe, the exit-code
table in --help, resume hints that repeat the overrides in effect (and work when run), and source
options that map one to one onto the source keys."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from helpers import QUICKSTART, write_curriculum
from typer.testing import CliRunner

import tripletctl.core.exit_codes as exit_codes
import tripletctl.train.interrupt as interrupt
from tripletctl.cli import app
from tripletctl.config.blocks import curriculum_to_dict
from tripletctl.config.validate import load_curriculum


def test_version_is_the_installed_one():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"tripletctl {version('tripletctl')}"


@pytest.mark.slow
def test_shell_completion_completes_commands_and_builtin_names():
    env = {**os.environ, "_TRIPLETCTL_COMPLETE": "complete_bash", "COMP_WORDS": "tripletctl cur", "COMP_CWORD": "1"}
    script = str(Path(sys.executable).parent / "tripletctl")  # the console script the shell would complete
    commands = subprocess.run([script], env=env, capture_output=True, text=True)
    assert commands.stdout.split() == ["curricula"]
    env.update(COMP_WORDS="tripletctl curricula copy qu", COMP_CWORD="3")
    names = subprocess.run([script], env=env, capture_output=True, text=True)
    assert names.stdout.split() == ["quickstart", "quickstart-triplets"]
    assert "--install-completion" in CliRunner().invoke(app, ["--help"]).output


def test_validate_json_prints_the_fully_resolved_curriculum():
    result = CliRunner().invoke(app, ["validate", str(QUICKSTART), "phases.1.steps=7", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed == curriculum_to_dict(load_curriculum(QUICKSTART, ["phases.1.steps=7"]))
    assert printed["phases"][1]["steps"] == 7
    assert printed["model"]["name"] == str(
        QUICKSTART.parent / "quickstart" / "tiny-bert"
    )  # ./quickstart/tiny-bert, resolved
    assert printed["train"]["log_every"] == "auto" and printed["train"]["report_to"] == []
    assert printed["phases"][0]["on_collapse"] == "warn"  # filled in from the train block


def test_tables_in_a_pipe_take_the_width_they_need(tmp_path):
    """`validate | cat`: no cell or caption line is wrapped, whatever COLUMNS says."""
    path = write_curriculum(tmp_path, steps=(4, 3, 3))
    long_dir = tmp_path / ("a-rather-long-directory-name-for-the-outputs-of-this-run" * 2)
    result = CliRunner().invoke(
        app,
        ["validate", str(path), f"train.output_dir={long_dir}", "phases.1.name=hard-negative-mining-with-a-long-name"],
        env={"COLUMNS": "60"},
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(re.match(r"^1\s+hard-negative-mining-with-a-long-name\s+hard-negative\s+32\s", line) for line in lines)
    assert f"output: {long_dir}" in lines


def test_train_help_has_the_exit_code_table():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "120"})
    codes = re.findall(r"^\s*(\d+)\s{2,}\S", result.output, flags=re.MULTILINE)
    assert codes == ["0", "1", "2", "3", "4", "5", "130"]
    assert exit_codes.EXIT_COLLAPSE_STOP == 3 and exit_codes.EXIT_INTERRUPTED == 130


class _SignalledAtOnce(interrupt.StopFlag):
    """As if Ctrl-C arrived during the first step: start-up (which asks `requested`) sees nothing,
    the training loop (which shares `signal` across ranks) stops after its step."""

    requested = False

    def __enter__(self):
        super().__enter__()
        self.signal = signal.SIGINT
        return self


def _hint(output: str) -> list[str]:
    command = re.search(r"continue with `([^`]+)`", output)
    assert command, output
    return shlex.split(command[1])


@pytest.mark.slow
def test_resume_hint_after_ctrl_c_repeats_the_overrides_and_works(tmp_path, monkeypatch):
    path = write_curriculum(tmp_path, steps=(3, 1, 1), checkpoint_every=0, output_dir=str(tmp_path / "default"))
    overrides = [f"train.output_dir={tmp_path / 'my run'}", "phases.0.steps=2"]
    monkeypatch.setattr(interrupt, "StopFlag", _SignalledAtOnce)
    interrupted = CliRunner().invoke(app, ["train", str(path), *overrides])
    assert interrupted.exit_code == 130, interrupted.output
    hint = _hint(interrupted.output)
    assert hint == ["tripletctl", "train", str(path), *overrides, "--resume"]
    monkeypatch.undo()
    resumed = CliRunner().invoke(app, hint[1:])
    assert resumed.exit_code == 0, resumed.output
    index = json.loads((tmp_path / "my run" / "run.json").read_text())
    assert [p["status"] for p in index["phases"]] == ["done", "done", "done"]
    assert index["phases"][0]["steps"] == 2 and not (tmp_path / "default").exists()


def test_pause_by_max_steps_says_how_to_continue(tmp_path):
    path = write_curriculum(tmp_path, steps=(2, 1, 1), checkpoint_every=0)
    result = CliRunner().invoke(app, ["train", str(path), "phases.2.steps=2", "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    assert _hint(result.output) == ["tripletctl", "train", str(path), "phases.2.steps=2", "--resume"]


def test_validate_on_the_command_line_imports_no_torch_transformers_or_datasets():
    """`tripletctl validate` checks a file: it must start in well under a second, not pay ~3 s for the
    libraries that training needs."""
    code = (
        "import sys\n"
        "sys.argv = ['tripletctl', 'validate', 'quickstart']\n"
        "from tripletctl.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as done:\n"
        "    assert done.code in (0, None), done.code\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules), file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "[]", out.stderr


def test_cli_source_options_map_one_to_one_onto_source_config():
    from tripletctl.cli_options import SOURCE_OPTIONS
    from tripletctl.config.blocks import SourceConfig

    assert list(SOURCE_OPTIONS) == [f.name for f in dataclasses.fields(SourceConfig)]


def test_help_describes_the_shipped_curricula_and_flags_take_no_value():
    """Issue 36, item 7: the top-level help described facenet as semi-hard -> hard-negative ->
    batch-hard at 500 -> 1000 -> 2000, and boolean flags rendered as `--resume <bool>`."""
    top = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "500 -> 1000 -> 2000" not in top and "semi-hard, then InfoNCE" in top
    assert "tripletctl init --data FILE --model FOLDER" in " ".join(top.split())
    for command in ([], ["train"], ["export"], ["eval"], ["init"]):
        shown = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output
        assert "<bool>" not in shown, command
    train_help = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert re.search(r"--max-steps\s+<int range>", train_help)  # options that take a value still say which
    assert re.search(r"--gpu\s+--cpu", CliRunner().invoke(app, ["init", "--help"], env={"COLUMNS": "200"}).output)
