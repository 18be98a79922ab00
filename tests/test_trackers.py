"""train.report_to with the real packages, offline: a run paused and resumed reports every step of
metrics.jsonl to TensorBoard (read back with TensorBoard's EventAccumulator), W&B (WANDB_MODE=offline,
the offline run directory's transaction log read back with W&B's own protobuf records) and MLflow (a
local file store read back with MlflowClient), each continuing one tracker run across the resume."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from helpers import write_curriculum
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config.validate import load_curriculum
from tripletctl.train.run import train
from tripletctl.train.trackers import TrackerError, Trackers, open_trackers, scalar_name, scalars

PHASES = ("semi-hard", "hard-negative", "batch-hard")


def test_scalars_are_named_by_phase_and_event():
    step = {
        "phase": "semi-hard",
        "phase_index": 0,
        "step": 3,
        "global_step": 3,
        "mining": "semi-hard",
        "loss": 0.5,
        "batch_hard_loss": 0.7,
        "grad_norm": None,
        "num_triplets": 12,
        "time": 1.0e9,
    }
    assert scalars(step) == {"semi-hard/loss": 0.5, "semi-hard/batch_hard_loss": 0.7, "semi-hard/num_triplets": 12.0}
    evaluation = {
        "event": "eval",
        "global_step": 4,
        "phase": "semi-hard",
        "step": 4,
        "recall@1": 0.9,
        "map@r": 0.4,
        "rows": 200,
    }
    assert scalars(evaluation) == {"semi-hard/eval/recall_at_1": 0.9, "semi-hard/eval/map_at_r": 0.4}
    collapse = {
        "event": "collapse",
        "global_step": 9,
        "phase": "hard",
        "action": "warn",
        "batch_hard_loss": 0.2,
        "embedding_spread": 0.01,
        "margin": 0.2,
    }
    assert scalars(collapse) == {
        "hard/collapse/batch_hard_loss": 0.2,
        "hard/collapse/embedding_spread": 0.01,
        "hard/collapse/margin": 0.2,
    }
    assert scalar_name("a b@c", "x!") == "a b_at_c/x_"


def _wandb_records(path: Path) -> list:
    """The records of a .wandb transaction log (LevelDB log framing: 32 KiB blocks of chunks with a
    7-byte header), parsed with W&B's own protobuf definitions."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos = path.read_bytes(), 32768, 7  # the file starts with a 7-byte W&B header
    assert raw[:4] == b":W&B"
    chunks, pending = [], b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            chunks.append(data)
        elif kind == 2:  # first
            pending = data
        elif kind == 3:  # middle
            pending += data
        elif kind == 4:  # last
            chunks.append(pending + data)
    records = []
    for data in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        records.append(record)
    return records


@pytest.fixture
def tracker_env(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # tripletctl opts in for its own store


@pytest.mark.slow
def test_paused_and_resumed_run_reports_every_record_to_all_three(tmp_path, tracker_env):
    path = write_curriculum(
        tmp_path, steps=(4, 3, 3), checkpoint_every=0, with_eval=True, report_to=["tensorboard", "wandb", "mlflow"]
    )
    assert train(load_curriculum(path), max_steps=5) == 0  # pauses in phase 1
    ids = json.loads((tmp_path / "run" / "trackers.json").read_text())
    assert train(load_curriculum(path), resume=True) == 0
    run = tmp_path / "run"
    assert json.loads((run / "trackers.json").read_text()) == ids  # the same tracker runs continued

    # the reference: what metrics.jsonl holds, and the untrained baseline in run.json
    steps, evals = {}, {}
    for phase_dir in sorted(run.glob("phase-*")):
        for line in (phase_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "eval":
                evals.setdefault(record["phase"], {})[record["global_step"]] = record["recall@1"]
            elif "event" not in record:
                steps.setdefault(record["phase"], {})[record["global_step"]] = record["loss"]
    evals[PHASES[0]][0] = json.loads((run / "run.json").read_text())["eval_untrained"]["recall@1"]
    assert [sorted(steps[p]) for p in PHASES] == [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10]]

    # TensorBoard: event files read back with TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    for phase in PHASES:
        events = accumulator.Scalars(f"{phase}/loss")
        assert {e.step: pytest.approx(e.value, rel=1e-6) for e in events} == steps[phase]
        assert len(events) == len(steps[phase])  # nothing twice after the resume
        got = {e.step: e.value for e in accumulator.Scalars(f"{phase}/eval/recall_at_1")}
        assert got == pytest.approx(evals[phase], rel=1e-6)
        assert f"{phase}/batch_hard_loss" in accumulator.Tags()["scalars"]
    assert "curriculum/text_summary" in accumulator.Tags()["tensors"]

    # W&B offline: two sessions (first run, resume) of one run id in run/wandb
    offline = sorted((run / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    assert len(offline) == 2
    history, config = {}, {}
    for directory in offline:
        for record in _wandb_records(next(directory.glob("*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                for key, value in row.items():
                    history.setdefault(key, {})[row["_step"]] = value
            elif kind == "run":
                assert record.run.run_id == ids["wandb"] and record.run.display_name == "run"
                config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    for phase in PHASES:
        assert history[f"{phase}/loss"] == pytest.approx(steps[phase], rel=1e-6)
        assert history[f"{phase}/eval/recall_at_1"] == pytest.approx(evals[phase], rel=1e-6)
    assert [p["mining"] for p in config["phases"]] == list(PHASES)
    assert config["train"]["report_to"] == ["tensorboard", "wandb", "mlflow"]

    # MLflow: the local file store in run/mlruns, read back with the client
    import mlflow
    from mlflow.tracking import MlflowClient

    store = (run / "mlruns").resolve().as_uri()
    mlflow.set_tracking_uri(store)
    try:
        found = mlflow.search_runs(experiment_names=["tripletctl"])
    finally:
        mlflow.set_tracking_uri(None)
    assert list(found["run_id"]) == [ids["mlflow"]["run_id"]] and list(found["status"]) == ["FINISHED"]
    client = MlflowClient(tracking_uri=store)
    mlrun = client.get_run(ids["mlflow"]["run_id"])
    assert mlrun.info.run_name == "run"
    assert mlrun.data.params["phases.2.mining"] == "batch-hard" and float(mlrun.data.params["train.lr"]) == 1e-3
    for phase in PHASES:
        history = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, f"{phase}/loss")}
        assert history == pytest.approx(steps[phase], rel=1e-6)
        got = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, f"{phase}/eval/recall_at_1")}
        assert got == pytest.approx(evals[phase], rel=1e-6)
    assert "curriculum.yaml" in [a.path for a in client.list_artifacts(mlrun.info.run_id)]


def test_a_tracker_named_but_not_installed_is_one_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    path = write_curriculum(tmp_path, steps=(1, 1, 1), report_to=["wandb"])
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: train.report_to names wandb, which is not installed: pip install 'tripletctl[wandb]'"
    ]
    assert not (tmp_path / "run").exists()  # before any work


def test_a_tracker_that_cannot_start_is_a_tracker_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://host/x")
    with pytest.raises(TrackerError, match="report_to mlflow: cannot start the run"):
        open_trackers(["mlflow"], tmp_path, {"train": {}})


class _Failing:
    def __init__(self) -> None:
        self.calls = 0

    def log(self, step: int, values: dict) -> None:
        self.calls += 1
        raise ConnectionError("server went away")

    def close(self, exit_code: int) -> None:
        pass


def test_a_tracker_that_fails_mid_run_is_dropped_with_one_warning():
    import io

    from rich.console import Console

    out, failing = io.StringIO(), _Failing()
    trackers = Trackers({"mlflow": failing}, console=Console(file=out, width=300))
    record = {"phase": "p", "global_step": 1, "loss": 0.1}
    trackers.log(record, record)
    assert failing.calls == 1 and trackers.backends == {}
    assert out.getvalue().count("warning") == 1 and "server went away" in out.getvalue()


def test_the_curriculum_names_exactly_the_backends_there_are():
    from tripletctl.config.choices import TRACKERS
    from tripletctl.train import trackers

    assert set(trackers._BACKENDS) == set(TRACKERS)
