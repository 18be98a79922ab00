"""OUTPUT/run.json, the run's index: the one reader and writer of the file (docs/outputs.md).

train/run_index.py decides what it says; `plot`, `eval`, `export` and start-up read it through here,
so a damaged or foreign run.json is one clear line wherever it is met.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tripletctl.core.errors import CheckpointError
from tripletctl.core.jsonio import write_json_atomic

RUN_FILE = "run.json"


def run_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / RUN_FILE


def read_run(run_dir: str | Path) -> dict[str, Any] | None:
    """The run index of `run_dir`, or None when there is none; a damaged one is a CheckpointError."""
    path = run_file(run_dir)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path} is not a tripletctl run index: expected an object")
    return record


def write_run(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Replace run.json whole (strict JSON)."""
    write_json_atomic(run_file(run_dir), record)
