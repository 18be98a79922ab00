"""A phase's `metrics.jsonl`: one JSON object per line, appended as the phase trains.

The one owner of the file: the runner opens it (dropping, on resume, what was written after the
checkpoint), appends step records and events to it, and summarises the phase from it; `plot`
reads it while a run trains, after a crash, or on another machine. Lines are strict JSON
(tripletctl.jsonio); a line cut by a crash or a full disk is skipped when read, and a line longer
than `MAX_LINE_BYTES` (core/files.py) is refused, so a foreign file is never read whole at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from tripletctl.core.errors import CheckpointError, writing
from tripletctl.core.files import FileRefused, read_lines
from tripletctl.core.jsonio import replace_text, strict_json

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """`PHASE_DIR/metrics.jsonl`: read it any time; `open` it (main process only) to append."""

    def __init__(self, phase_dir: Path | str):
        self.path = Path(phase_dir) / METRICS_FILE
        self._file: TextIO | None = None

    def records(self, *, strict_text: bool = False) -> list[dict[str, Any]]:
        """Every whole record, in order; [] when there is no file. Bytes that are not text are
        replaced (the runner summarising its own file), or with `strict_text` one CheckpointError
        (a damaged or foreign file handed to `plot`)."""
        return [record for _, record in self._lines(strict_text)]

    def open(self, *, keep_up_to: int | None = None) -> None:
        """Open for appending. `keep_up_to` (on resume): first drop the records written after that
        global step, so the log has no duplicate steps."""
        if keep_up_to is not None and self.path.is_file():
            kept = "".join(line + "\n" for line, record in self._lines() if record.get("global_step", 0) <= keep_up_to)
            replace_text(self.path, kept)  # a crash now must not lose the log
        with writing(self.path):
            self._file = self.path.open("a", encoding="utf-8")

    def append(self, *records: dict[str, Any]) -> None:
        """Write `records` and flush (a crash loses at most the line being written); a no-op when
        not open (the other ranks under torchrun)."""
        if self._file is None:
            return
        with writing(self.path):
            self._file.write("".join(strict_json(r) + "\n" for r in records))
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # a full disk already reported by the write that failed
                pass
            self._file = None

    def _lines(self, strict_text: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
        if not self.path.is_file():
            return
        try:  # bounded per line (core/files.py): a device or a file without newlines is refused
            lines = list(read_lines(self.path, errors="strict" if strict_text else "replace"))
        except FileRefused as error:
            raise CheckpointError(str(error)) from None
        except (OSError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{self.path} cannot be read as JSON lines: {error}") from None
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash or a full disk (or an empty one)
            if isinstance(record, dict):
                yield line, record
