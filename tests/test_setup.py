"""What `train` checks before any work (tripletctl/train/setup.py): an output directory it may not
overwrite, a bad source, a layout that does not match the data, and a `--resume` whose
configuration may not continue the checkpoint."""

from __future__ import annotations

import pytest
import yaml
from helpers import ASSETS, write_curriculum
from typer.testing import CliRunner

from tripletctl.cli import app


@pytest.mark.slow
def test_refuses_to_overwrite_a_run_and_resume_needs_a_checkpoint(tmp_path):
    path = write_curriculum(tmp_path, steps=(1, 1, 1))
    runner = CliRunner()
    missing = runner.invoke(app, ["train", str(path), "--resume"])
    assert missing.exit_code == 2 and "no checkpoint" in missing.output
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    again = runner.invoke(app, ["train", str(path)])
    assert again.exit_code == 2 and "--resume" in again.output


def test_bad_source_fails_before_training(tmp_path):
    path = write_curriculum(tmp_path, source=tmp_path / "nowhere" / "*.jsonl")
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.layout=pairs", "data.samples_per_class=2"], "layout pairs would drop the negative column 'negative'"),
        (
            [],
            "columns 'text', 'label' not found; available columns: anchor, positive, negative; layout triplets would fit",
        ),
    ],
)
def test_layout_mismatch_fails_before_training_in_one_line(tmp_path, overrides, expected):

    path = write_curriculum(tmp_path, source=ASSETS / "triplets.jsonl")
    result = CliRunner().invoke(app, ["train", str(path), *overrides])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_refuses_to_mix_configurations_inside_a_phase(tmp_path):
    path = write_curriculum(tmp_path, steps=(3, 1, 1), checkpoint_every=0)
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(path), "--max-steps", "2"]).exit_code == 0
    for override, key, old, new in [
        ("phases.0.batch_size=32", "batch_size", "16", "32"),
        ("phases.0.mining=batch-all", "mining", "'semi-hard'", "'batch-all'"),
        ("phases.0.margin=0.5", "margin", "0.2", "0.5"),
        ("phases.0.distance=squared-euclidean", "distance", "'euclidean'", "'squared-euclidean'"),
        ("phases.0.loss=soft-margin", "loss", "'margin'", "'soft-margin'"),
        ("data.samples_per_class=8", "data.samples_per_class", "4", "8"),
        ("phases.0.batch_classes=neighbours", "batch_classes", "'random'", "'neighbours'"),
        ("data.neighbour_refresh=5", "data.neighbour_refresh", "20", "5"),
        ("phases.0.mined_negatives={per_class: 4}", "mined_negatives", "None", "{'per_class': 4, 'pool_rows': 20000"),
    ]:
        result = runner.invoke(app, ["train", str(path), override, "--resume"])
        assert result.exit_code == 2, result.output
        assert f"phases[0] (semi-hard) is half done (step 2 of 3): its {key} was {old} and is now {new}" in " ".join(
            result.output.split()
        ), result.output
    spec = yaml.safe_load(path.read_text())
    renamed = tmp_path / "renamed.yaml"
    spec["phases"][0]["name"] = "gentle"
    renamed.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["train", str(renamed), "--resume"])
    assert (
        result.exit_code == 2
        and "phases[0] was 'semi-hard' when the run was checkpointed and is 'gentle'" in " ".join(result.output.split())
    ), result.output
    assert not (tmp_path / "run" / "phase-0-gentle").exists()
    spec["phases"] = spec["phases"][1:]
    removed = tmp_path / "removed.yaml"
    removed.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["train", str(removed), "--resume"])
    assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit)
    assert "phases[0] was 'semi-hard'" in " ".join(result.output.split()), result.output
    # a chunk size is not a configuration of the phase: it may change
    assert (
        runner.invoke(app, ["train", str(path), "phases.0.chunk_size=8", "--resume", "--max-steps", "1"]).exit_code == 0
    )


@pytest.mark.slow
def test_resume_refuses_another_memory_inside_a_phase(tmp_path):
    """Issue 23 #9: the queue went from 128 to 32 rows inside one phase; now refused like batch_size."""
    path = write_curriculum(tmp_path, steps=(3, 1, 1), checkpoint_every=0, memory={"size": 64})
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(path), "--max-steps", "2"]).exit_code == 0
    for override, key, old, new in [
        ("phases.0.memory={size: 32}", "memory.size", "64", "32"),
        ("phases.0.memory={size: 64, start_step: 1}", "memory.start_step", "0", "1"),
        ("phases.0.memory=null", "memory", "{'size': 64, 'start_step': 0}", "None"),
    ]:
        result = runner.invoke(app, ["train", str(path), override, "--resume"])
        assert result.exit_code == 2, result.output
        output = " ".join(result.output.split())
        assert output.count("error:") == 1 and "Traceback" not in output, result.output
        assert f"phases[0] (semi-hard) is half done (step 2 of 3): its {key} was {old} and is now {new};" in output
        assert f"Restore {key}," in output
    # the next phase may use another memory: only a half-done phase keeps its own
    assert runner.invoke(app, ["train", str(path), "phases.1.memory={size: 32}", "--resume"]).exit_code == 0


@pytest.mark.slow
def test_resume_after_removing_the_last_started_phase_is_a_clear_error(tmp_path):
    path = write_curriculum(tmp_path, steps=(1, 4, 1), checkpoint_every=0)
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(path), "--max-steps", "2"]).exit_code == 0
    spec = yaml.safe_load(path.read_text())
    spec["phases"] = spec["phases"][:1]
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["train", str(path), "--resume"])
    assert result.exit_code == 2, result.output
    assert "the run stopped in phases[1] (hard-negative), but" in " ".join(result.output.split())
    assert "phases[1] (hard-negative) was removed" in " ".join(result.output.split())
