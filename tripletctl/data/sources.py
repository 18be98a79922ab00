"""Data sources: what `data.source` names, how `datasets` loads it, which rows are usable.

A source is a Hugging Face Hub name, local files (a file, a directory, a glob) or a {label: glob}
mapping of plain-text files; `datasets.load_dataset` reads it in streaming mode with the curriculum's
`load_dataset` arguments passed through unchanged. The training stream (stream.py) and the finite
reads for evaluation (`read_rows`) share the resolution, the column checks and the row cleaning here.
See docs/data.md for the user-facing rules.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tripletctl.config.choices import FORMATS
from tripletctl.config.layouts import LABELLED, LAYOUT_OF, LAYOUTS, Layout
from tripletctl.core.errors import DataError, one_line

if TYPE_CHECKING:
    from tripletctl.config.blocks import SourceConfig

CHUNK_ROWS = 1000  # rows per read from `datasets` (row-by-row iteration is ~6x slower)
CHECK_ROWS = 1000  # rows check_source reads looking for a usable one
_EXTENSIONS = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".txt": "text",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_GLOB_CHARS = set("*?[")


@dataclass
class LabelledRows:
    texts: list[str]
    labels: list[int]  # dense ints; same original label -> same int
    skipped: int
    triplets: list[tuple[int, int, int]] = field(default_factory=list)  # triplets layout: (a, p, given n)


# ----------------------------------------------------------------------------- resolve and load


@dataclass(frozen=True)
class Source:
    """A resolved `data.source`: a hub name, or concrete files and the builder that reads them."""

    builder: str  # "json" | "parquet" | "csv" | "text" | hub name
    files: list[str] | dict[str, list[str]] | None  # None for the hub; {label: files} for text
    label: str  # for messages

    @property
    def hub(self) -> bool:
        return self.files is None


def _empty_files(src: Source) -> list[str]:
    """The local files of a source that hold 0 bytes (a frequent cause of blank library errors)."""
    files = src.files if isinstance(src.files, list) else [f for fs in (src.files or {}).values() for f in fs]
    return [f for f in files if "://" not in f and os.path.isfile(f) and os.path.getsize(f) == 0]


def _expand(path: str) -> list[str]:
    """Files named by a file, a directory (recursively) or a glob; remote URLs pass through."""
    if "://" in path:
        return [path]
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
        return found
    if _GLOB_CHARS & set(path):
        return sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    return []


def _format_of(path: str) -> str | None:
    name = path.lower()
    for suffix in _COMPRESSION:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return _EXTENSIONS.get(os.path.splitext(name)[1])


def _looks_local(path: str) -> bool:
    return (
        path.startswith((".", "/", "~"))
        or bool(_GLOB_CHARS & set(path))
        or _format_of(path) is not None
        or os.sep + os.sep in path
        or path.count("/") > 1
    )


def _files_or_error(pattern: str) -> list[str]:
    files = _expand(pattern)
    if not files:
        raise DataError(f"no files match '{pattern}' (tried it as a file, a directory and a glob)")
    return files


def resolve(source: str | dict[str, str], format: str | None) -> Source:
    if isinstance(source, dict):
        if format not in (None, "text"):
            raise DataError(f"a {{label: glob}} source needs format 'text', not '{format}'")
        if not source:
            raise DataError("format 'text' needs at least one {label: glob} entry")
        return Source(
            "text",
            {str(label): _files_or_error(str(pattern)) for label, pattern in source.items()},
            label=json.dumps(source),
        )
    source = str(source)
    if format == "text":
        raise DataError(f"format 'text' needs a {{label: glob}} mapping as source, got '{source}'")
    if format is not None:
        if format not in FORMATS:
            raise DataError(f"unknown data format '{format}' (choose from {', '.join(FORMATS)})")
        return Source(format, _files_or_error(source), label=source)
    files = _expand(source)
    if not files:
        if _looks_local(source):
            raise DataError(f"no files match '{source}' (tried it as a file, a directory and a glob)")
        return Source(source, None, label=source)
    formats = {_format_of(f) for f in files}
    if len(formats) != 1 or None in formats or "text" in formats:
        kinds = ", ".join(sorted({os.path.splitext(f)[1] or "(none)" for f in files}))
        raise DataError(
            f"cannot tell the format of '{source}' from its file extensions ({kinds}): "
            f"set data.format to one of json, parquet, csv (text needs a {{label: glob}} source)"
        )
    return Source(formats.pop(), files, label=source)


LOCAL_SPLIT = "train"  # what `datasets` calls the one split of local files


def local_split_problem(label: str, split: str) -> str | None:
    """Local files have one split, all of their rows: any other name would silently read them whole."""
    if split == LOCAL_SPLIT:
        return None
    return (
        f"split '{split}' asked of the local data source '{label}': local files have one split, their "
        f"whole content, so another name would read every row of them; point the source at the "
        f"held-out file instead (and leave split at {LOCAL_SPLIT})"
    )


_LOUD_BUILDERS = ("datasets.packaged_modules.csv.csv", "datasets.packaged_modules.json.json")


def load(src: Source, split: str, kwargs: dict | None, order_seed: int | None):
    """An IterableDataset over the source; local file order is shuffled with `order_seed`."""
    import datasets

    for builder in _LOUD_BUILDERS:  # they log a raw line before raising; the raise becomes our one line
        logging.getLogger(builder).setLevel(logging.CRITICAL)
    if not src.hub and (problem := local_split_problem(src.label, split)):
        raise DataError(problem)
    kwargs = dict(kwargs or {})
    kwargs.update(split=split, streaming=True)

    def ordered(files: list[str]) -> list[str]:
        files = list(files)
        if order_seed is not None:
            random.Random(order_seed).shuffle(files)
        return files

    try:
        if src.hub:
            return datasets.load_dataset(src.builder, **kwargs)
        if isinstance(src.files, dict):
            parts = [
                datasets.load_dataset("text", data_files={split: ordered(files)}, **kwargs).map(
                    lambda row, label=label: {"label": label}
                )
                for label, files in src.files.items()
            ]
            if len(parts) == 1:
                return parts[0]
            return datasets.interleave_datasets(parts, stopping_strategy="all_exhausted_without_replacement")
        return datasets.load_dataset(src.builder, data_files={split: ordered(src.files)}, **kwargs)
    except DataError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFound, DatasetNotFound, Connection...)
        if isinstance(error, UnicodeDecodeError) or "codec can't decode" in str(error):
            raise reading_failed(src, error) from error
        where = (
            f"not a local path; tried the Hugging Face Hub dataset '{src.builder}', split '{split}'"
            if src.hub
            else f"tried the '{src.builder}' builder on {len(src.files)} file(s)"
        )
        empty = _empty_files(src)
        reason = f"{len(empty)} file(s) are empty (0 bytes), e.g. '{empty[0]}'" if empty else one_line(error)
        raise DataError(f"cannot load data source '{src.label}' ({where}): {reason}") from error


# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Columns:
    """Which columns make a row, in row order: labelled (text, label), pairs (anchor, positive),
    triplets (anchor, positive, negative...). `text` format always reads `text`/`label`."""

    layout: Layout
    names: tuple[str, ...]

    @staticmethod
    def of(config: SourceConfig, src: Source) -> Columns:
        if config.layout not in LAYOUTS:
            raise DataError(f"unknown data layout '{config.layout}' (choose from {', '.join(LAYOUTS)})")
        if isinstance(src.files, dict):
            return Columns(LABELLED, ("text", "label"))
        return Columns(LAYOUT_OF[config.layout], tuple(config.columns))


def _good_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _good_label(value: Any) -> Any:
    """The label as a JSON-able hashable value, or None when the row has no usable label."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, (int, float)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def rows_of_chunk(chunk: dict[str, list], cols: Columns) -> tuple[list[list], int, int]:
    """Normalised rows ([text, label]; pairs [anchor, positive]; triplets [anchor, positive,
    negative...]), rows read, rows skipped (a missing/empty text or label anywhere in the row)."""
    n = len(next(iter(chunk.values()))) if chunk else 0
    columns = [chunk.get(name) for name in cols.names]
    if any(column is None for column in columns):
        return [], n, n
    rows = []
    if not cols.layout.grouped:
        for text, label in zip(*columns):
            label = _good_label(label)
            if label is not None and _good_text(text):
                rows.append([text, label])
    else:
        for row in zip(*columns):
            if all(_good_text(text) for text in row):
                rows.append(list(row))
    return rows, n, n - len(rows)


def column_names(ds) -> list[str] | None:
    try:
        names = ds.column_names
    except Exception:
        names = None
    return list(names) if names else None


# ----------------------------------------------------------------------------- checks and finite reads


def negative_columns_in(names: list[str], config: SourceConfig) -> list[str]:
    """Columns that hold given negatives: the configured ones, else `negative`, else negative_1..N
    (sentence-transformers' `mine_hard_negatives` output), in number order."""
    found = [c for c in config.negative_columns if c in names]
    if found:
        return found
    if "negative" in names:
        return ["negative"]
    numbered = [(int(m.group(1)), c) for c in names if (m := re.fullmatch(r"negative_(\d+)", c))]
    return [c for _, c in sorted(numbered)]


def _fitting_layout(names: list[str], config: SourceConfig) -> str:
    """The layout these columns would fit, as a hint for a mismatch message."""
    if config.anchor_column in names and config.positive_column in names:
        negatives = negative_columns_in(names, config)
        if not negatives:
            return "layout pairs would fit"
        if tuple(negatives) == tuple(config.negative_columns):
            return "layout triplets would fit"
        return f"layout triplets with negative columns {', '.join(negatives)} would fit"
    if config.text_column in names and config.label_column in names:
        return "layout labelled would fit"
    if config.layout == LABELLED.name and (config.text_column in names or config.label_column in names):
        key = "label_column" if config.text_column in names else "text_column"
        others = [n for n in names if n not in (config.text_column, config.label_column)]
        if others:  # one of the two is there: name the columns the other could be
            return f"set {key} (--{key.replace('_', '-')} on the command line) to one of {', '.join(others)}"
    return (
        "no layout fits with the column names set: name them (text/label columns for labelled; "
        "anchor/positive/negative columns for pairs and triplets)"
    )


def columns_problem(names: list[str], cols: Columns, config: SourceConfig, label: str) -> str | None:
    """One line when the layout's columns are missing from `names` (or pairs would silently drop a
    negative column), naming the columns found and the layout that would fit them; else None.
    Shared by the training check below and `validate`'s header check (data/header.py)."""
    missing = [c for c in cols.names if c not in names]
    if missing:
        kind = "column" if len(missing) == 1 else "columns"
        problem = f"{kind} {', '.join(repr(c) for c in missing)} not found"
    elif not cols.layout.given_negatives and negative_columns_in(names, config):
        dropped = negative_columns_in(names, config)
        problem = (
            f"layout pairs would drop the negative column{'s' if len(dropped) > 1 else ''} "
            f"{', '.join(repr(c) for c in dropped)}"
        )
    else:
        return None
    return (
        f"data source '{label}' does not fit layout {cols.layout.name}: {problem}; available columns: "
        f"{', '.join(names)}; {_fitting_layout(names, config)}"
    )


def _local_files(src: Source) -> list[str]:
    files = src.files if isinstance(src.files, list) else [f for fs in (src.files or {}).values() for f in fs]
    return [f for f in files if "://" not in f and os.path.isfile(f)]


def _first_bad_utf8(path: str) -> tuple[int, int, int] | None:
    """(byte offset, line, the byte) of the first byte of `path` that is not UTF-8, or None; read in
    1 MiB blocks (any file size), stopping at the first bad byte."""
    start = lines = 0  # the file offset of `data`, and the newlines before it
    carry = b""
    with open(path, "rb") as handle:
        while True:
            block = handle.read(1 << 20)
            data = carry + block
            if not data:
                return None
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as error:
                if block and error.reason == "unexpected end of data":  # a character cut by the block's end
                    carry = data[error.start :]
                    data = data[: error.start]
                else:
                    bad = error.start
                    return start + bad, lines + data.count(b"\n", 0, bad) + 1, data[bad]
            if not block:
                return None
            start += len(data)
            lines += data.count(b"\n")


def reading_failed(src: Source, error: BaseException) -> DataError:
    """One line for a read that failed. For a file that is not UTF-8 the libraries say "position 0"
    of some internal block; the file's own byte offset and line are found here instead."""
    if isinstance(error, UnicodeDecodeError) or "codec can't decode" in str(error):
        for path in _local_files(src):
            try:
                found = _first_bad_utf8(path)
            except OSError:
                continue
            if found is not None:
                offset, line, byte = found
                return DataError(
                    f"data source '{src.label}': {path} is not UTF-8: byte 0x{byte:02x} at byte offset {offset:,} "
                    f"(line {line:,}) cannot be decoded; save the file as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)"
                )
    return DataError(f"reading data source '{src.label}' failed: {one_line(error)}")


def _check_columns(ds, cols: Columns, config: SourceConfig, src: Source) -> None:
    """The layout's columns exist (`columns_problem`), else a DataError."""
    names = column_names(ds)
    if names is None:
        try:
            first = next(iter(ds.take(1)), None)
        except Exception as error:
            raise reading_failed(src, error) from error
        names = list(first) if first else None
    if names is None:
        return  # empty: the usable-rows check reports it
    problem = columns_problem(names, cols, config, src.label)
    if problem is not None:
        raise DataError(problem)


def _open_checked(config: SourceConfig) -> tuple[Source, Columns, Any]:
    src = resolve(config.source, config.format)
    cols = Columns.of(config, src)
    ds = load(src, config.split, dict(config.load_dataset or {}), None)
    _check_columns(ds, cols, config, src)
    return src, cols, ds


def check_source(data: SourceConfig) -> None:
    """Fail before training, with one line, when the source cannot feed a run: unreachable, columns
    that do not fit the layout (the existing ones are listed), or no usable row among the first
    CHECK_ROWS."""
    src, cols, ds = _open_checked(data)
    read = good = 0
    try:
        for chunk in ds.iter(batch_size=CHUNK_ROWS):
            rows, n, _ = rows_of_chunk(chunk, cols)
            read += n
            good += len(rows)
            if good or read >= CHECK_ROWS:
                break
    except Exception as error:
        raise reading_failed(src, error) from error
    if read == 0:
        raise DataError(f"data source '{src.label}' has no rows")
    if good == 0:
        what = "text" if cols.layout.grouped else "text or label"
        raise DataError(
            f"no usable rows in the first {read} rows of '{src.label}' (all have a missing or "
            f"empty {what}: columns {', '.join(map(repr, cols.names))})"
        )


def first_labelled_rows(source: SourceConfig, limit: int) -> list[list]:
    """The first `limit` good [text, label] rows of a labelled source, labels as the stream reads
    them (data/stream.py's `label_id` hashes them): the pool that `mined_negatives` embeds."""
    src, cols, ds = _open_checked(source)
    rows: list[list] = []
    try:
        for chunk in ds.iter(batch_size=CHUNK_ROWS):
            rows += rows_of_chunk(chunk, cols)[0]
            if len(rows) >= limit:
                break
    except Exception as error:
        raise reading_failed(src, error) from error
    return rows[:limit]


def read_rows(source: SourceConfig, limit: int | None = None) -> LabelledRows:
    """A finite, unshuffled read of up to `limit` texts (for evaluation). Labels become dense ints in
    order of first appearance. Pairs and triplets: each row's anchor and positive get a new label and
    each given negative one of its own (a distractor no query retrieves as relevant); `triplets` lists
    (anchor, positive, negative) indices for the given-negative accuracy."""
    src, cols, ds = _open_checked(source)
    texts: list[str] = []
    labels: list[int] = []
    triplets: list[tuple[int, int, int]] = []
    dense: dict[Any, int] = {}
    next_label = skipped = 0
    step = len(cols.names) if cols.layout.grouped else 1
    try:
        for chunk in ds.iter(batch_size=CHUNK_ROWS):
            rows, _, bad = rows_of_chunk(chunk, cols)
            skipped += bad
            for row in rows:
                if limit is not None and len(texts) + step > limit:
                    return LabelledRows(texts, labels, skipped, triplets)
                if not cols.layout.grouped:
                    texts.append(row[0])
                    if row[1] not in dense:
                        dense[row[1]], next_label = next_label, next_label + 1
                    labels.append(dense[row[1]])
                    continue
                a, negatives = len(texts), len(row) - 2
                texts += row
                labels += [next_label] * 2 + list(range(next_label + 1, next_label + 1 + negatives))
                next_label += 1 + negatives
                triplets += [(a, a + 1, a + 2 + j) for j in range(negatives)]
    except DataError:
        raise
    except Exception as error:
        raise reading_failed(src, error) from error
    return LabelledRows(texts, labels, skipped, triplets)
