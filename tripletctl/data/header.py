"""What `validate` (and `train`, before any model is built) reads of a curriculum's local data: the
columns, and the first rows (up to HEADER_ROWS) to count usable rows and classes.

Light on purpose: plain `json`, `csv` and `pyarrow` instead of `datasets`, so `validate` still starts
without torch, transformers or datasets (tests/test_cli.py). The rows are cleaned by sources.py's own
`rows_of_chunk` and the columns checked by its `columns_problem`, so a problem reads the same here as
when training starts. Hub datasets, remote files and load_dataset arguments only `datasets` knows are
not read here: `train` checks them when it starts (sources.py `check_source`).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import itertools
import json
import lzma
import os
from collections.abc import Iterator
from typing import Any

from tripletctl.config.blocks import SourceConfig, describe_source
from tripletctl.config.sizing import DataFacts
from tripletctl.core.errors import DataError, one_line
from tripletctl.data.sources import (
    CHUNK_ROWS,
    Columns,
    Source,
    columns_problem,
    local_split_problem,
    resolve,
    rows_of_chunk,
)

HEADER_ROWS = 50_000  # rows read at most per source: exact counts for small corpora, lower bounds beyond
MAX_WHOLE_JSON = 64 * 2**20  # a JSON array (not JSON lines) is parsed whole: only up to this size
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_HONOURED = {"csv": {"sep", "delimiter"}, "json": {"field"}, "parquet": set(), "text": set()}


class _NotRead(Exception):
    """The file cannot be read here as `datasets` would read it: not checked, not a problem."""


def _open_text(path: str) -> io.TextIOBase:
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".zst", ".lz4"):
        raise _NotRead(f"{os.path.basename(path)} is {suffix[1:]}-compressed")
    opener = _OPENERS.get(suffix)
    if opener is not None:
        return io.TextIOWrapper(opener(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace", newline="")


def _json_rows(path: str, field: str | None) -> Iterator[dict]:
    with _open_text(path) as handle:
        start = handle.read(4096)
        if field is not None or start.lstrip().startswith("["):
            if os.path.getsize(path) > MAX_WHOLE_JSON:
                raise _NotRead(f"{os.path.basename(path)} is one large JSON document")
            try:
                document = json.loads(start + handle.read())
            except ValueError as error:
                raise _NotRead(f"{os.path.basename(path)}: {one_line(error)}") from None
            rows = document.get(field) if field is not None and isinstance(document, dict) else document
            if not isinstance(rows, list):
                raise _NotRead(f"{os.path.basename(path)} holds no list of rows")
            yield from (row for row in rows if isinstance(row, dict))
            return
        for line in _lines(start, handle):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise _NotRead(f"{os.path.basename(path)} is not JSON lines") from None
            if isinstance(row, dict):
                yield row


def _lines(start: str, handle: io.TextIOBase) -> Iterator[str]:
    rest = ""
    for block in itertools.chain((start,), iter(lambda: handle.read(1 << 16), "")):
        parts = (rest + block).split("\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def _csv_rows(path: str, delimiter: str) -> Iterator[dict]:
    with _open_text(path) as handle:
        for row in csv.DictReader(handle, delimiter=delimiter):
            yield {key: (value if value != "" else None) for key, value in row.items() if key is not None}


def _parquet_chunks(path: str) -> Iterator[dict[str, list]]:
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK_ROWS):
            yield batch.to_pydict()
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise _NotRead(f"{os.path.basename(path)}: {one_line(error)}") from None


def _chunks(src: Source, config: SourceConfig) -> Iterator[dict[str, list]]:
    """Chunks of rows as `datasets` gives them (column -> values), file by file."""
    if isinstance(src.files, dict):
        for label, files in src.files.items():
            for path in files:
                with _open_text(path) as handle:
                    for part in _batched(line.rstrip("\r\n") for line in handle):
                        yield {"text": part, "label": [label] * len(part)}
        return
    kwargs = config.load_dataset or {}
    for path in src.files:
        if src.builder == "parquet":
            yield from _parquet_chunks(path)
            continue
        rows = (
            _csv_rows(path, kwargs.get("sep") or kwargs.get("delimiter") or ",")
            if src.builder == "csv"
            else _json_rows(path, kwargs.get("field"))
        )
        for batch in _batched(rows):
            yield _columns_of(batch)


def _batched(items: Iterator) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == CHUNK_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch


def _columns_of(rows: list[dict]) -> dict[str, list]:
    names = list(dict.fromkeys(key for row in rows for key in row))
    return {name: [row.get(name) for row in rows] for name in names}


def read_facts(config: SourceConfig, max_rows: int = HEADER_ROWS) -> DataFacts | None:
    """The columns, usable rows and (labelled layout) distinct rows per class of a local source, with
    any problem a run would stop on; None for a hub dataset or remote files (not read here)."""
    label = describe_source(config.source)
    try:
        src = resolve(config.source, config.format)
    except DataError as error:
        return DataFacts(label, note=f"not checked here: {error}")
    files = src.files if isinstance(src.files, list) else [f for fs in (src.files or {}).values() for f in fs]
    if src.hub or any("://" in f for f in files):
        return None
    unknown = sorted(set(config.load_dataset or {}) - _HONOURED.get(src.builder, set()))
    if unknown:
        return DataFacts(label, note=f"not checked here: load_dataset {', '.join(unknown)} is for datasets to read")
    if (problem := local_split_problem(src.label, config.split)) is not None:
        return DataFacts(src.label, problems=(problem,))
    cols = Columns.of(config, src)
    names: list[str] = []
    read = usable = 0
    classes: dict[Any, set[str]] = {}
    complete = True
    try:
        for chunk in _chunks(src, config):
            names += [name for name in chunk if name not in names]
            rows, n, _ = rows_of_chunk(chunk, cols)
            read += n
            usable += len(rows)
            if not cols.layout.grouped:
                for text, row_label in rows:
                    classes.setdefault(row_label, set()).add(text)
            if read >= max_rows:
                complete = False
                break
    except (_NotRead, OSError, UnicodeError, csv.Error) as error:
        return DataFacts(label, note=f"not checked here: {one_line(error)}")
    problems = []
    if read and (problem := columns_problem(names, cols, config, src.label)) is not None:
        problems.append(problem)
    elif read == 0:
        problems.append(f"data source '{src.label}' has no rows")
    elif usable == 0:
        what = "text" if cols.layout.grouped else "text or label"
        problems.append(
            f"no usable rows in the first {read:,} rows of '{src.label}' (all have a missing or empty {what}: "
            f"columns {', '.join(map(repr, cols.names))})"
        )
    return DataFacts(
        label=src.label,
        columns=tuple(names),
        rows_read=read,
        usable_rows=usable,
        complete=complete,
        class_rows=None if cols.layout.grouped else tuple(sorted((len(t) for t in classes.values()), reverse=True)),
        problems=tuple(problems),
    )


class FactsReader:
    """The `read_data` of `load_curriculum`: reads each block's source once and keeps what it found
    (`facts`: block -> DataFacts or None), for the lines `validate` prints under the plan."""

    def __init__(self, max_rows: int = HEADER_ROWS):
        self.max_rows = max_rows
        self.facts: dict[str, DataFacts | None] = {}

    def __call__(self, block: str, config: SourceConfig) -> DataFacts | None:
        self.facts[block] = read_facts(config, self.max_rows)
        return self.facts[block]
