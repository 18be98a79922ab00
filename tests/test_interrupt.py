"""Ctrl-C / SIGTERM (tripletctl/train/interrupt.py `StopFlag`): the step ends, a checkpoint is written,
the exit code is 130, and `--resume` continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import write_curriculum
from typer.testing import CliRunner

from tripletctl.cli import app

pytestmark = pytest.mark.slow  # end to end: the real CLI, subprocesses, several processes or faults


def test_sigterm_checkpoints_and_exits_cleanly_then_resumes(tmp_path):
    path = write_curriculum(tmp_path, steps=(400, 2, 2), checkpoint_every=0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tripletctl", "train", str(path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    metrics = tmp_path / "run" / "phase-0-semi-hard" / "metrics.jsonl"
    deadline = time.time() + 600  # a busy CI machine can take minutes to start up
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    assert metrics.exists(), "no step within the deadline"  # a SIGTERM during start-up saves nothing
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output
    state = json.loads((tmp_path / "run" / "phase-0-semi-hard" / "checkpoint" / "state.json").read_text())
    assert 2 <= state["step"] < 400
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert logged[-1]["step"] == state["step"]
    index = json.loads((tmp_path / "run" / "run.json").read_text())
    assert index["phases"][0]["status"] == "interrupted"
    # resume with fewer steps left to do: finish phase 0 quickly by overriding its length
    resumed = CliRunner().invoke(app, ["train", str(path), f"phases.0.steps={state['step'] + 1}", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["phases"][2]["status"] == "done"
