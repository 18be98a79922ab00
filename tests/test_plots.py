"""`tripletctl plot` and the inspect-collapse figure, from synthetic files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch

from tripletctl.core.errors import CheckpointError, TripletctlError
from tripletctl.evaluation.plots import load_run, plot_collapse, plot_run

PHASES = [("semi-hard", 64, 40), ("hard-negative", 128, 30), ("batch-hard", 256, 20)]


def write_run(run_dir: Path, with_run_json: bool = True, collapse_at: int | None = 75) -> Path:
    """A plausible 3-phase run: loss falls, spread grows, evals at each phase end."""
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"curriculum": "quickstart.yaml", "phases": []}
    global_step = 0
    for index, (name, batch, steps) in enumerate(PHASES):
        directory = run_dir / f"phase-{index}-{name}"
        directory.mkdir()
        meta["phases"].append(
            {
                "index": index,
                "name": name,
                "dir": directory.name,
                "mining": name,
                "batch_size": batch,
                "margin": 0.2,
                "steps": steps,
                "status": "done",
            }
        )
        lines = []
        for step in range(1, steps + 1):
            global_step += 1
            t = global_step / 90
            lines.append(
                json.dumps(
                    {
                        "phase": name,
                        "phase_index": index,
                        "step": step,
                        "global_step": global_step,
                        "loss": 0.05 * (1 - t) + 0.02 * index,
                        "batch_hard_loss": 0.35 - 0.2 * t + 0.01 * math.sin(step),
                        "active_fraction": 0.8 - 0.5 * t,
                        "mean_ap": 0.4,
                        "mean_an": 0.9,
                        "embedding_spread": 0.3 + 0.6 * t,
                        "lr": 1e-3,
                    }
                )
            )
            if collapse_at == global_step:
                lines.append(
                    json.dumps({"event": "collapse", "global_step": global_step, "phase": name, "action": "warn"})
                )
        lines.append(
            json.dumps(
                {
                    "event": "eval",
                    "global_step": global_step,
                    "phase": name,
                    "recall@1": 0.3 + 0.2 * index,
                    "map@r": 0.1 + 0.15 * index,
                }
            )
        )
        lines.append('{"phase": "torn line')  # a run killed mid-write
        (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if with_run_json:
        (run_dir / "run.json").write_text(json.dumps(meta))
    return run_dir


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300


def test_plot_run_default_output(tmp_path):
    run = write_run(tmp_path / "run")
    written = plot_run(run)
    assert written == run / "run.png"
    assert_png(written)


def test_plot_run_without_run_json_globs_phases_in_index_order(tmp_path):
    run = write_run(tmp_path / "run", with_run_json=False, collapse_at=None)
    (run / "phase-10-extra").mkdir()
    (run / "phase-10-extra" / "metrics.jsonl").write_text(
        json.dumps({"phase": "extra", "global_step": 91, "loss": 0.01, "batch_hard_loss": 0.1}) + "\n"
    )
    phases = load_run(run)
    assert [p["index"] for p in phases] == [0, 1, 2, 10]  # numeric, not lexicographic
    assert [p["name"] for p in phases][:3] == [name for name, _, _ in PHASES]
    assert all(len(p["records"]) for p in phases)
    out = plot_run(run, tmp_path / "elsewhere" / "run.png")
    assert_png(out)


def test_margins_come_from_run_json(tmp_path):
    phases = load_run(write_run(tmp_path / "run"))
    assert [p["margin"] for p in phases] == [0.2, 0.2, 0.2]
    assert sum(r.get("event") == "eval" for p in phases for r in p["records"]) == 3


def test_missing_or_empty_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        plot_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TripletctlError, match="no metrics to plot"):
        plot_run(tmp_path / "empty")


def test_cli_plot(tmp_path):
    from typer.testing import CliRunner

    from tripletctl.cli import app

    run = write_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["plot", str(run), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 0, result.output
    assert_png(tmp_path / "x.png")
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.parametrize("collapsed", [False, True])
def test_plot_collapse(tmp_path, collapsed):
    from tripletctl.evaluation.collapse import collapse_report

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(10)
    if collapsed:
        emb = torch.nn.functional.normalize(torch.ones(100, 16), dim=1)
    else:
        centres = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
        emb = torch.nn.functional.normalize(centres[labels] + 0.08 * torch.randn(100, 16, generator=g), dim=1)
    out = plot_collapse(collapse_report(emb, labels), tmp_path / "sub" / "c.png")
    assert_png(out)


def test_png_path_says_the_real_file(tmp_path):
    from tripletctl.evaluation.plots import png_path

    (tmp_path / "dir").mkdir()
    assert png_path(tmp_path / "dir", "collapse.png") == tmp_path / "dir" / "collapse.png"
    assert png_path(tmp_path / "figure", "collapse.png") == tmp_path / "figure.png"
    assert png_path(tmp_path / "figure.svg", "collapse.png") == tmp_path / "figure.svg"


def test_infonce_gets_its_own_axis_and_the_held_out_panel_its_own_range(tmp_path, monkeypatch):
    """Issue 36, item 6: InfoNCE (~4.5) and margin losses (0.4-1.0) shared one axis, flattening the
    margin curves, and the held-out panel was fixed at 0-1, so 0.82 -> 0.83 was invisible."""
    from tripletctl.evaluation import plots

    run = write_run(tmp_path / "run")
    (run / "curriculum.yaml").write_text(
        "phases:\n  - {name: semi-hard}\n  - {name: hard-negative}\n  - {name: batch-hard, loss: infonce}\n"
    )
    records = (run / "phase-2-batch-hard" / "metrics.jsonl").read_text().splitlines()
    lifted = []
    for line in records:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            lifted.append(line)
            continue
        if "event" not in record:
            record["loss"] = 4.5 - record["step"] * 0.01  # InfoNCE's scale
        if record.get("event") == "eval":
            record.update({"recall@1": 0.83, "map@r": 0.82})
        lifted.append(json.dumps(record))
    (run / "phase-2-batch-hard" / "metrics.jsonl").write_text("\n".join(lifted) + "\n")
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.plot_run(run)
    ax_loss, _, _, ax_eval, ax_info = figures[0].axes  # the twin axis is added last
    assert ax_loss.get_ylim()[1] < 1.0 and ax_info.get_ylim()[0] > 4.0  # each curve on its own scale
    assert ax_info.get_ylabel() == "InfoNCE loss" and ax_loss.get_ylabel() == "margin loss"
    assert ax_eval.get_ylim() == pytest.approx(plots.eval_limits([0.3, 0.5, 0.83, 0.1, 0.25, 0.82]))
    assert plots.eval_limits([0.82, 0.83]) == pytest.approx((0.8, 0.85))


def test_a_run_without_infonce_keeps_one_loss_axis(tmp_path, monkeypatch):
    from tripletctl.evaluation import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.plot_run(write_run(tmp_path / "run"))
    assert len(figures[0].axes) == 4 and figures[0].axes[0].get_ylabel() == "loss"


def _inject(monkeypatch, point: str, what: str) -> None:
    """TRIPLETCTL_FAULT=POINT:1:WHAT, as if it had been set when the process started."""
    import tripletctl.core.faults as faults

    monkeypatch.setattr(faults, "_POINT", point)
    monkeypatch.setattr(faults, "_AT", "1")
    monkeypatch.setattr(faults, "_SIGNAL", what)
    monkeypatch.setattr(faults, "_reached", {})


@pytest.mark.parametrize("which", ["plot", "collapse"])
def test_a_full_disk_while_a_picture_is_written_is_one_line_and_leaves_no_file(tmp_path, monkeypatch, which):
    """The disk fills after the picture's bytes went out (fault point plot-write): one OutputError
    line naming the picture, and neither it nor its temporary is left (they were 0-byte PNGs)."""
    from tripletctl.core.errors import OutputError
    from tripletctl.evaluation.collapse import collapse_report

    _inject(monkeypatch, "plot-write", "ENOSPC")
    out = tmp_path / "out" / "x.png"
    with pytest.raises(OutputError, match=r"cannot write .*x.png: No space left on device"):
        if which == "plot":
            plot_run(write_run(tmp_path / "run"), out)
        else:
            emb = torch.nn.functional.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), dim=1)
            plot_collapse(collapse_report(emb, torch.arange(4).repeat_interleave(10)), out)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_plot_to_a_real_full_disk_is_one_line_and_leaves_no_file(tmp_path):
    """A 64 KiB tmpfs (root only): the real ENOSPC, through the real CLI."""
    import os
    import subprocess
    import sys

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)]).returncode:
        pytest.skip("no tmpfs can be mounted here (the injected ENOSPC above covers the code)")
    try:
        run = write_run(tmp_path / "run")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        done = subprocess.run(
            [sys.executable, "-m", "tripletctl", "plot", str(run), "--out", str(disk / "run.png")],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert "No space left on device" in lines[0] and list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_a_run_file_linked_from_outside_the_run_is_refused(tmp_path):
    from tripletctl.core.folders import FolderRefused

    run = write_run(tmp_path / "run")
    outside = tmp_path / "elsewhere.json"
    (run / "run.json").rename(outside)
    (run / "run.json").symlink_to(outside)
    with pytest.raises(FolderRefused, match=r"run.json is a symlink to .*elsewhere.json, outside the run"):
        plot_run(run)
    assert not (run / "run.png").exists()
