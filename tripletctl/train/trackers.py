"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, MLflow.

The runner hands every record it writes to `metrics.jsonl` to `Trackers.log` as well; each tracker
turns it into scalars named by phase (`semi-hard/loss`, `semi-hard/eval/recall_at_1`,
`batch-hard/collapse/embedding_spread`) at the record's global step. `metrics.jsonl` stays the
record of truth: a tracker that fails mid-run is reported once and dropped, training goes on.

Each tracker is an optional extra (`pip install 'tripletctl[wandb]'`). Where each one writes, and
how a resumed run continues the same tracker run (the ids live in OUTPUT/trackers.json), is in
docs/monitoring.md.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from tripletctl.core.errors import TripletctlError
from tripletctl.core.exit_codes import EXIT_DONE, EXIT_INTERRUPTED
from tripletctl.core.files import FileRefused
from tripletctl.core.jsonio import read_json

STATE_FILE = "trackers.json"
_NOT_SCALARS = {"event", "phase", "phase_index", "step", "global_step", "mining", "time", "action", "rows"}


class TrackerError(TripletctlError):
    """A tracker that is named but not installed, or that cannot start its run."""


def require_installed(names: tuple[str, ...] | list[str]) -> None:
    """Fail before any work when a tracker in `report_to` is missing, naming the extra to install."""
    for name in names:
        try:
            importlib.import_module(name)  # each tracker's extra installs the module of its name
        except ImportError:
            raise TrackerError(
                f"train.report_to names {name}, which is not installed: pip install 'tripletctl[{name}]'"
            ) from None


def scalar_name(*parts: str) -> str:
    """`semi-hard`, `eval`, `recall@1` -> `semi-hard/eval/recall_at_1`: a name every tracker accepts
    (MLflow allows only letters, digits, `_-. /`)."""
    return "/".join(re.sub(r"[^\w\-. ]", "_", part.replace("@", "_at_")) for part in parts)


def scalars(record: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl record, named by phase (and event kind)."""
    kind = record.get("event")
    prefix = (str(record.get("phase", "run")),) + ((kind,) if kind else ())
    return {
        scalar_name(*prefix, key): float(value)
        for key, value in record.items()
        if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


class _TensorBoard:
    """Event files in OUTPUT/tensorboard: `tensorboard --logdir runs/` shows every run under runs/."""

    def __init__(self, output_dir: Path, config: dict, resume_step: int | None, state: dict):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what the crashed run logged after the checkpoint we resume
        self.writer = SummaryWriter(
            log_dir=str(output_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step is not None else None
        )
        self.writer.add_text(
            "curriculum", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", global_step=resume_step or 0
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a run killed without warning still leaves its curves

    def close(self, exit_code: int) -> None:
        self.writer.close()


class _WandB:
    """One W&B run per output directory, resumed by id; WANDB_MODE, WANDB_PROJECT etc. apply."""

    def __init__(self, output_dir: Path, config: dict, resume_step: int | None, state: dict):
        import wandb

        run_id = state.get("wandb") if resume_step is not None else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "tripletctl",
            name=output_dir.name,
            dir=str(output_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
        )
        state["wandb"] = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


class _MLflow:
    """One MLflow run per output directory, reopened by id. The store is MLFLOW_TRACKING_URI, or else
    a local file store in OUTPUT/mlruns (`mlflow ui --backend-store-uri OUTPUT/mlruns`)."""

    def __init__(self, output_dir: Path, config: dict, resume_step: int | None, state: dict):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (output_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        previous = state.get("mlflow") or {}
        if resume_step is not None and previous.get("tracking_uri") == uri:
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tripletctl"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=output_dir.name).info.run_id
            params = [Param(key, str(value)[:6000]) for key, value in _flatten(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per call
                self.client.log_batch(self.run_id, params=params[start : start + 100])
        # params cannot change once logged; the curriculum as run (overrides included) is an artifact
        self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "curriculum.yaml")
        state["mlflow"] = {"run_id": self.run_id, "tracking_uri": uri}

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, exit_code: int) -> None:
        status = {EXIT_DONE: "FINISHED", EXIT_INTERRUPTED: "KILLED"}.get(exit_code, "FAILED")
        self.client.set_terminated(self.run_id, status=status)


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
# config/choices.py names these backends (TRACKERS); tests/test_trackers.py keeps the two equal


class Trackers:
    """The trackers of one run behind one interface; with none configured every call does nothing."""

    def __init__(self, backends: dict[str, Any] | None = None, console: Console | None = None):
        self.backends = dict(backends or {})
        self.console = console

    def log(self, *records: dict) -> None:
        """Send metrics.jsonl records (a step's record, eval and collapse events) to every tracker."""
        for record in records:
            values = scalars(record)
            if not values:
                continue
            for name, backend in list(self.backends.items()):
                try:
                    backend.log(int(record["global_step"]), values)
                except Exception as error:  # noqa: BLE001 - a tracker outage must not end the training
                    self._drop(name, error)

    def close(self, exit_code: int) -> None:
        """Mark each tracker run finished (0), killed (130) or failed (anything else). Idempotent."""
        for name, backend in list(self.backends.items()):
            try:
                backend.close(exit_code)
            except Exception as error:  # noqa: BLE001
                self._warn(f"{name}: could not close the run: {error}")
        self.backends.clear()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Only an exception closes the runs here (as killed or failed); a normal end calls `close`
        with the run's exit code."""
        if exc_type is not None:
            self.close(130 if issubclass(exc_type, KeyboardInterrupt) else 1)

    def _drop(self, name: str, error: Exception) -> None:
        self.backends.pop(name, None)
        self._warn(f"{name}: logging failed, no more metrics go there this run ({error}); metrics.jsonl has everything")

    def _warn(self, message: str) -> None:
        if self.console is not None:
            self.console.print(f"[bold yellow]warning:[/] {message}", soft_wrap=True)


def open_trackers(
    names: tuple[str, ...] | list[str],
    output_dir: str | os.PathLike,
    config: dict,
    resume_step: int | None = None,
    console: Console | None = None,
) -> Trackers:
    """Start (or, with `resume_step`, continue) one run per tracker for the run in `output_dir`,
    with the curriculum as run as its configuration."""
    output = Path(output_dir)
    if names:
        output.mkdir(parents=True, exist_ok=True)
    state_path = output / STATE_FILE
    state: dict = {}
    if resume_step is not None and state_path.exists():
        try:
            state = read_json(state_path)
        except (OSError, ValueError, FileRefused):
            state = {}  # a damaged id file costs only the continuity of the tracker runs
    trackers = Trackers(console=console)
    for name in names:
        try:
            trackers.backends[name] = _BACKENDS[name](output, config, resume_step, state)
        except Exception as error:  # noqa: BLE001 - e.g. W&B without an API key, an unreachable server
            trackers.close(1)
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TrackerError(f"train.report_to {name}: cannot start the run: {detail}") from None
    if names:
        tmp = state_path.with_name(STATE_FILE + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, state_path)
    return trackers
