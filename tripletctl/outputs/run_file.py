"""OUTPUT/run.json, the run's index: the one reader and writer of the file (docs/outputs.md).

train/run_index.py decides what it says; `plot`, `eval`, `export` and start-up read it through here,
so a damaged or foreign run.json is one clear line wherever it is met. Every run.json written says
`"written_by": "tripletctl"`: outputs/lock.py tells a tripletctl run from another tool's directory
by it (and a run written before the marker by its shape, `looks_like_ours`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tripletctl.core.errors import CheckpointError
from tripletctl.core.files import FileRefused
from tripletctl.core.jsonio import read_json, write_json_atomic

RUN_FILE = "run.json"
WRITTEN_BY = "tripletctl"  # the value of run.json's "written_by"


def run_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / RUN_FILE


def read_run(run_dir: str | Path) -> dict[str, Any] | None:
    """The run index of `run_dir`, or None when there is none; a damaged one is a CheckpointError."""
    path = run_file(run_dir)
    if not path.exists():
        return None
    try:
        record = read_json(path)
    except FileRefused as error:
        raise CheckpointError(str(error)) from None
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path} is not a tripletctl run index: expected an object")
    return record


def written_by_us(record: dict[str, Any]) -> bool:
    """run.json carries tripletctl's marker."""
    return record.get("written_by") == WRITTEN_BY


def looks_like_ours(record: dict[str, Any]) -> bool:
    """run.json has the shape every tripletctl version wrote (for runs from before the marker)."""
    phases = record.get("phases")
    return (
        isinstance(record.get("output_dir"), str)
        and isinstance(phases, list)
        and all(isinstance(p, dict) and {"index", "name", "status"} <= p.keys() for p in phases)
    )


def write_run(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Replace run.json whole (strict JSON), with tripletctl's marker first."""
    write_json_atomic(run_file(run_dir), {"written_by": WRITTEN_BY, **record})
