"""bench/quality.py's tripletctl rows are curricula the real validator accepts, at the row's budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tripletctl.cli import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402

BENCH = Path(quality.__file__)


@pytest.mark.parametrize("row", sorted(quality.ALL_TRIPLETCTL_ROWS))
@pytest.mark.parametrize("size", sorted(quality.SIZES))
def test_rows_validate_and_spend_the_budget(tmp_path, tiny_bert_dir, assets_dir, row, size):
    phases, overrides = quality.ALL_TRIPLETCTL_ROWS[row]
    budget = quality.SIZES[size]
    data = assets_dir / "many_class.jsonl"
    if size == "gpu":  # validate reads local data: a stand-in whose classes fill the GPU batches (1,024 rows)
        data = tmp_path / "stand-in.jsonl"
        data.write_text("".join(f'{{"text": "k{c} row {i}", "label": "k{c}"}}\n' for c in range(300) for i in range(8)))
    plan = quality.curriculum(phases, overrides, data, tmp_path / "run", budget, 0, tiny_bert_dir)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(plan))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    spent = sum(p["batch_size"] * p["steps"] for p in plan["phases"])
    assert abs(spent - budget.samples) <= 0.05 * budget.samples


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_the_gpu_size_without_a_gpu_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, str(BENCH), "--size", "gpu"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "--size gpu trains on a CUDA device and this machine has none" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_budget_below_one_batch_is_refused_with_exit_2():
    done = subprocess.run([sys.executable, str(BENCH), "--samples", "10"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "--samples must be at least the batch (64), got 10" in done.stderr


@pytest.mark.parametrize("row", ["tc-facenet", "tc-semi-hard"])
def test_a_larger_budget_scales_the_steps_not_the_batches(tmp_path, tiny_bert_dir, assets_dir, row):
    phases, overrides = quality.ALL_TRIPLETCTL_ROWS[row]
    cpu = quality.SIZES["cpu"]
    plans = [
        quality.curriculum(phases, overrides, assets_dir / "many_class.jsonl", tmp_path, size, 0, tiny_bert_dir)
        for size in (cpu, quality.dataclasses.replace(cpu, samples=4 * cpu.samples))
    ]
    assert [p["batch_size"] for p in plans[0]["phases"]] == [p["batch_size"] for p in plans[1]["phases"]]
    assert [4 * p["steps"] for p in plans[0]["phases"]] == [p["steps"] for p in plans[1]["phases"]]
