"""Strict JSON out, whole files on disk, bounded reads: the one owner of how tripletctl handles JSON.

Every JSON tripletctl writes (run.json, summary.json, metrics.jsonl, `eval --json`, the collapse
report) must parse with any strict reader, so NaN and Infinity become null (docs/outputs.md); and a
file is replaced whole, so a crash leaves the old file or the new, never half of one. Reading is
bounded (core/files.py): a device, a FIFO or an oversized file is refused before it is parsed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tripletctl.core.errors import writing
from tripletctl.core.files import MAX_JSON_BYTES, read_text


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN/inf float, however deeply nested in dicts, lists and tuples, as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def strict_json(payload: Any, indent: int | None = None) -> str:
    """JSON text without NaN or Infinity (they are null); anything else unknown is written as str."""
    return json.dumps(finite_or_null(payload), indent=indent, default=str, allow_nan=False)


def replace_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename: a crash leaves the old file or the new, never half;
    a refused write (disk full, read-only) is one OutputError line and leaves no temporary file."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with writing(path):
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_json_atomic(path: Path, payload: Any) -> None:
    """`payload` as indented strict JSON, replacing `path` whole."""
    replace_text(path, strict_json(payload, indent=2) + "\n")


def read_json(path: str | Path, limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON in regular file `path`, read to at most `limit` bytes (FileRefused otherwise);
    OSError and ValueError (bad JSON, not UTF-8) are left to the caller, who names the file's role."""
    return json.loads(read_text(path, limit))
