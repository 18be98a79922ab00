"""Progress in a file or pipe: which steps get a line (a fake clock for the time rule), and the real
CLI with stdout sent to a file: one whole line per reported step, the numbers of metrics.jsonl."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest
from helpers import write_curriculum
from rich.console import Console

from tripletctl.train.progress_bar import BarProgress, PlainProgress, phase_progress

LINE = re.compile(
    r"^phase (?P<index>\d+) (?P<phase>\S+) step (?P<step>\d+)/(?P<total>\d+) loss (?P<loss>\d+\.\d{4}) "
    r"batch-hard (?P<hard>\d+\.\d{4}) active (?P<active>\d\.\d\d) (?P<rate>\d+) samples/s "
    r"elapsed (?P<elapsed>\d+:\d\d:\d\d) eta (?P<eta>\d+:\d\d:\d\d)$"
)
RECORD = {"loss": 0.12345, "batch_hard_loss": 0.3, "active_fraction": 0.5, "samples_per_s": 100.0}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def plain(total: int, log_every: int | str, start: int = 0) -> tuple[PlainProgress, io.StringIO, FakeClock]:
    out, clock = io.StringIO(), FakeClock()
    console = Console(file=out, width=80)
    return PlainProgress(console, "phase 0 semi-hard", total, start, log_every, clock=clock), out, clock


def reported_steps(out: io.StringIO) -> list[int]:
    return [int(LINE.match(line)["step"]) for line in out.getvalue().splitlines()]


def test_every_n_steps_plus_first_and_last():
    progress, out, _ = plain(total=23, log_every=5)
    for step in range(1, 24):
        progress.update(step, RECORD, batch_size=64)
    assert reported_steps(out) == [1, 5, 10, 15, 20, 23]


def test_auto_waits_for_both_10_steps_and_30_seconds():
    progress, out, clock = plain(total=100, log_every="auto")
    for step in range(1, 101):
        clock.now += 1.0 if step <= 31 else 10.0  # 1 s a step, then 10 s a step
        progress.update(step, RECORD, batch_size=64)
    # 1 s/step: 30 s is the later condition; 10 s/step: 10 steps is
    assert reported_steps(out) == [1, 31, 41, 51, 61, 71, 81, 91, 100]


def test_a_line_holds_the_numbers_rate_elapsed_and_eta():
    progress, out, clock = plain(total=10, log_every=2)
    clock.now += 4.0
    progress.update(1, RECORD, batch_size=64)
    clock.now += 4.0
    progress.update(2, RECORD, batch_size=64)
    lines = out.getvalue().splitlines()
    second = LINE.match(lines[1])
    assert second["loss"] == "0.1235" and second["hard"] == "0.3000" and second["active"] == "0.50"
    assert second["rate"] == "16"  # 64 samples in the 4 s since the previous line
    assert second["elapsed"] == "0:00:08" and second["eta"] == "0:00:32"  # 4 s a step, 8 steps left
    assert all(len(line) > 80 for line in lines)  # longer than the console: written whole anyway


def test_resumed_phase_reports_its_first_step_and_rates_only_new_steps():
    progress, out, clock = plain(total=50, log_every=20, start=30)
    for step in range(31, 51):
        clock.now += 2.0
        progress.update(step, RECORD, batch_size=8)
    assert reported_steps(out) == [31, 40, 50]
    last = LINE.match(out.getvalue().splitlines()[-1])
    assert last["elapsed"] == "0:00:40" and last["eta"] == "0:00:00"


def test_a_stop_mid_phase_gets_a_line():
    progress, out, _ = plain(total=100, log_every=50)
    progress.update(1, RECORD, batch_size=8)
    progress.update(7, RECORD, batch_size=8, final=True)
    assert reported_steps(out) == [1, 7]


def test_terminal_gets_the_bar_and_a_file_the_lines():
    terminal = Console(file=io.StringIO(), force_terminal=True)
    bar = phase_progress(terminal, "phase 0 x", 10, 0, "auto")
    bar.stop()
    assert isinstance(bar, BarProgress)
    assert isinstance(phase_progress(Console(file=io.StringIO()), "phase 0 x", 10, 0, "auto"), PlainProgress)


@pytest.mark.slow
def test_train_to_a_file_writes_one_whole_line_per_reported_step(tmp_path):
    """The issue's case: stdout is a file (SLURM, nohup, CI) and the console is 80 columns."""
    path = write_curriculum(tmp_path, steps=(4, 3, 3), checkpoint_every=0)
    log = tmp_path / "train.log"
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "COLUMNS": "80"}
    with log.open("w") as stdout:
        result = subprocess.run(
            [sys.executable, "-m", "tripletctl", "train", str(path), "train.log_every=2"],
            cwd=tmp_path,
            env=env,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            timeout=600,
        )
    assert result.returncode == 0, result.stderr
    lines = [line for line in log.read_text().splitlines() if line.startswith("phase ")]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [(m["index"], m["step"], m["total"]) for m in matches] == [
        ("0", "1", "4"),
        ("0", "2", "4"),
        ("0", "4", "4"),
        ("1", "1", "3"),
        ("1", "2", "3"),
        ("1", "3", "3"),
        ("2", "1", "3"),
        ("2", "2", "3"),
        ("2", "3", "3"),
    ]
    assert max(len(line) for line in lines) > 80  # not cut at the 80 columns the console has
    for match in matches:  # the numbers are those of the step's record in metrics.jsonl
        phase_dir = next((tmp_path / "run").glob(f"phase-{match['index']}-*"))
        records = [json.loads(line) for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]
        record = next(r for r in records if "event" not in r and r["step"] == int(match["step"]))
        assert match["phase"] == record["phase"]
        assert float(match["loss"]) == round(record["loss"], 4)
        assert float(match["hard"]) == round(record["batch_hard_loss"], 4)
        assert float(match["active"]) == round(record["active_fraction"], 2)
        assert int(match["rate"]) > 0
    assert "━" not in log.read_text()  # no progress bar in a file
