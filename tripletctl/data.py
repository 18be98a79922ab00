"""Training data: a seeded, resumable stream of class-balanced, tokenised batches.

The corpus is read with `datasets` in streaming mode, so memory depends on the buffer sizes, never on
the corpus size. The shuffle buffer and the per-class buffers are ours (not `IterableDataset.shuffle`)
because `datasets` cannot restore a shuffle buffer's content, and exact resume needs it: the stream
state is the raw read position (`IterableDataset.state_dict()`) plus every buffered row.
See docs/data.md for the user-facing rules.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import queue
import random
import re
import signal
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tripletctl.curriculum import LAYOUTS, SourceConfig, source_fields
from tripletctl.errors import DataError, TripletctlError, WorkerDiedError

FORMATS = ("json", "parquet", "csv", "text")
STATE_VERSION = 1
CHUNK_ROWS = 1000  # rows per read from `datasets` (row-by-row iteration is ~6x slower)
CHECK_ROWS = 1000  # rows check_source reads looking for a usable one
REUSE_FACTOR = 2  # reuse classes once the ready classes hold this many batches of rows
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


# ----------------------------------------------------------------------------- public types


@dataclass
class Batch:
    token_ids: torch.Tensor  # (total tokens,) int64: the rows' tokens back to back, unpadded
    lengths: torch.Tensor  # (B,) int64: tokens per row
    labels: torch.Tensor  # (B,) int64: a stable 63-bit hash of the class, equal on every rank
    state: dict  # stream state *after* this batch (JSON-serialisable)
    rows_seen: int  # cumulative rows read from the source by this rank (bad ones included)
    rows_skipped: int  # cumulative bad rows (missing/empty text, missing label)
    classes_evicted: int  # cumulative classes dropped from the buffers before they filled
    texts: list[str] = field(default_factory=list)  # the rows, in batch order
    epoch: int = 0  # passes over this rank's shard started so far, minus one
    rows_evicted: int = 0  # cumulative rows dropped with evicted classes
    pad_id: int = 0  # the tokenizer's padding id

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, L) padded on the right to the longest row; the trainer pads on its device instead."""
        return pad_ragged(self.token_ids, self.lengths, self.pad_id)[0]

    @property
    def attention_mask(self) -> torch.Tensor:
        return pad_ragged(self.token_ids, self.lengths, self.pad_id)[1]


def pad_ragged(token_ids: torch.Tensor, lengths: torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows stored back to back -> (input_ids, attention_mask), (B, longest row), padded on the right.

    Batches travel unpadded (a long-tailed batch padded to its longest row is 2.5-4.5x its real
    tokens) and are padded where they are used; the chunking then trims each chunk to its own rows.
    """
    width = int(lengths.max()) if lengths.numel() else 0
    positions = torch.arange(width, device=lengths.device)
    mask = positions.unsqueeze(0) < lengths.unsqueeze(1)
    starts = torch.cumsum(lengths, 0) - lengths
    index = (starts.unsqueeze(1) + positions.unsqueeze(0)).clamp(max=max(token_ids.numel() - 1, 0))
    ids = token_ids[index] if token_ids.numel() else torch.zeros(mask.shape, dtype=torch.int64, device=lengths.device)
    return torch.where(mask, ids, torch.full_like(ids, pad_id)), mask.long()


@dataclass
class LabelledRows:
    texts: list[str]
    labels: list[int]  # dense ints; same original label -> same int
    skipped: int
    triplets: list[tuple[int, int, int]] = field(default_factory=list)  # triplets layout: (a, p, given n)


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    """A resolved `data.source`: a hub name, or concrete files and the builder that reads them."""

    builder: str  # "json" | "parquet" | "csv" | "text" | hub name
    files: list[str] | dict[str, list[str]] | None  # None for the hub; {label: files} for text
    label: str  # for messages

    @property
    def hub(self) -> bool:
        return self.files is None


def _one_line(error: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    if not text and isinstance(error, BaseException):  # some libraries raise with no message at all
        text = type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _empty_files(src: _Source) -> list[str]:
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


def _resolve(source: str | dict[str, str], format: str | None) -> _Source:
    if isinstance(source, dict):
        if format not in (None, "text"):
            raise DataError(f"a {{label: glob}} source needs format 'text', not '{format}'")
        if not source:
            raise DataError("format 'text' needs at least one {label: glob} entry")
        return _Source(
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
        return _Source(format, _files_or_error(source), label=source)
    files = _expand(source)
    if not files:
        if _looks_local(source):
            raise DataError(f"no files match '{source}' (tried it as a file, a directory and a glob)")
        return _Source(source, None, label=source)
    formats = {_format_of(f) for f in files}
    if len(formats) != 1 or None in formats or "text" in formats:
        kinds = ", ".join(sorted({os.path.splitext(f)[1] or "(none)" for f in files}))
        raise DataError(
            f"cannot tell the format of '{source}' from its file extensions ({kinds}): "
            f"set data.format to one of json, parquet, csv (text needs a {{label: glob}} source)"
        )
    return _Source(formats.pop(), files, label=source)


def _load(src: _Source, split: str, kwargs: dict | None, order_seed: int | None):
    """An IterableDataset over the source; local file order is shuffled with `order_seed`."""
    import datasets

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
        where = (
            f"not a local path; tried the Hugging Face Hub dataset '{src.builder}', split '{split}'"
            if src.hub
            else f"tried the '{src.builder}' builder on {len(src.files)} file(s)"
        )
        empty = _empty_files(src)
        reason = f"{len(empty)} file(s) are empty (0 bytes), e.g. '{empty[0]}'" if empty else _one_line(error)
        raise DataError(f"cannot load data source '{src.label}' ({where}): {reason}") from error


# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class _Columns:
    """Which columns make a row, in row order: labelled (text, label), pairs (anchor, positive),
    triplets (anchor, positive, negative...). `text` format always reads `text`/`label`."""

    layout: str
    names: tuple[str, ...]

    @staticmethod
    def of(config: SourceConfig, src: _Source) -> _Columns:
        if config.layout not in LAYOUTS:
            raise DataError(f"unknown data layout '{config.layout}' (choose from {', '.join(LAYOUTS)})")
        if isinstance(src.files, dict):
            return _Columns("labelled", ("text", "label"))
        return _Columns(config.layout, tuple(config.columns))


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


def _rows_of_chunk(chunk: dict[str, list], cols: _Columns) -> tuple[list[list], int, int]:
    """Normalised rows ([text, label]; pairs [anchor, positive]; triplets [anchor, positive,
    negative...]), rows read, rows skipped (a missing/empty text or label anywhere in the row)."""
    n = len(next(iter(chunk.values()))) if chunk else 0
    columns = [chunk.get(name) for name in cols.names]
    if any(column is None for column in columns):
        return [], n, n
    rows = []
    if cols.layout == "labelled":
        for text, label in zip(*columns):
            label = _good_label(label)
            if label is not None and _good_text(text):
                rows.append([text, label])
    else:
        for row in zip(*columns):
            if all(_good_text(text) for text in row):
                rows.append(list(row))
    return rows, n, n - len(rows)


def _label_id(label: Any) -> int:
    """A stable non-negative int63 per class: same class -> same id on every rank and after resume."""
    digest = hashlib.blake2b(repr((type(label).__name__, label)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _column_names(ds) -> list[str] | None:
    try:
        names = ds.column_names
    except Exception:
        names = None
    return list(names) if names else None


# ----------------------------------------------------------------------------- the raw stream


class _RawRows:
    """Good rows of this rank's shard, epoch after epoch, forever.

    Position = (epoch, `IterableDataset.state_dict()` after the last chunk read, the chunk's unread rows).
    Epoch e reads local files in an order shuffled with seed + e."""

    def __init__(self, data: Any, seed: int, rank: int, world_size: int, state: dict | None):
        self.data, self.seed, self.rank, self.world_size = data, seed, rank, world_size
        self.src = _resolve(data.source, data.format)
        self.cols = _Columns.of(data, self.src)
        state = state or {}
        self.epoch: int = state.get("epoch", 0)
        self.pending: list[list] = list(state.get("pending", []))
        self.cursor = 0
        self.rows_read: int = state.get("rows_read", 0)
        self.rows_skipped: int = state.get("rows_skipped", 0)
        self.good_this_epoch: int = state.get("good_this_epoch", 0)
        self._ds_state: dict | None = state.get("dataset")
        self._open(self._ds_state)

    def _open(self, ds_state: dict | None) -> None:
        from datasets.distributed import split_dataset_by_node

        ds = _load(self.src, self.data.split, dict(self.data.load_dataset or {}), self.seed + self.epoch)
        names = _column_names(ds)
        wanted = list(self.cols.names)
        if names and all(c in names for c in wanted) and len(names) > len(wanted):
            ds = ds.select_columns(wanted)  # do not decode columns nobody reads
        if self.world_size > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        if ds_state is not None:
            ds.load_state_dict(ds_state)
        self._ds = ds
        self._chunks = ds.iter(batch_size=CHUNK_ROWS)

    def _fill(self) -> None:
        while self.cursor >= len(self.pending):
            try:
                chunk = next(self._chunks)
            except StopIteration:
                if self.good_this_epoch == 0:
                    raise DataError(
                        f"no usable rows in data source '{self.src.label}' for rank {self.rank} of "
                        f"{self.world_size} ({self.rows_skipped} rows skipped: missing/empty text or label)"
                    ) from None
                self.epoch += 1
                self.good_this_epoch = 0
                self._open(None)
                continue
            except DataError:
                raise
            except Exception as error:
                raise DataError(f"reading data source '{self.src.label}' failed: {_one_line(error)}") from error
            rows, read, skipped = _rows_of_chunk(chunk, self.cols)
            self._ds_state = self._ds.state_dict()
            self.pending, self.cursor = rows, 0
            self.rows_read += read
            self.rows_skipped += skipped
            self.good_this_epoch += len(rows)

    def next_row(self) -> list:
        self._fill()
        row = self.pending[self.cursor]
        self.cursor += 1
        return row

    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "dataset": self._ds_state,
            "pending": self.pending[self.cursor :],
            "rows_read": self.rows_read,
            "rows_skipped": self.rows_skipped,
            "good_this_epoch": self.good_this_epoch,
        }


class _Shuffler:
    """Reservoir-style shuffle buffer with a seeded RNG: each new row swaps out a random buffered one."""

    def __init__(self, raw: _RawRows, size: int, seed: int, state: dict | None):
        self.raw, self.size = raw, max(int(size), 1)
        self.rng = random.Random(seed)
        self.buffer: list[list] = []
        if state:
            self.buffer = list(state["buffer"])
            version, internal, gauss = state["rng"]
            self.rng.setstate((version, tuple(internal), gauss))

    def next_row(self) -> list:
        if self.size <= 1 and not self.buffer:
            return self.raw.next_row()
        if len(self.buffer) > self.size:  # resumed with a smaller buffer: drain without reading
            i = self.rng.randrange(len(self.buffer))
            self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
            return self.buffer.pop()
        while len(self.buffer) < self.size:
            self.buffer.append(self.raw.next_row())
        i = self.rng.randrange(self.size)
        row, self.buffer[i] = self.buffer[i], self.raw.next_row()
        return row

    def state(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"buffer": list(self.buffer), "rng": [version, list(internal), gauss]}


STOP_CHECK_ROWS = 4096  # rows read between checks of close() while a batch is being assembled
STALL_EPOCHS = 3  # passes over the data with no class filling before the stream gives up with an error


class _Stopped(Exception):
    """close() was called while the reader thread was assembling a batch."""


class _Batcher:
    """Class-balanced batches from shuffled rows (rules in docs/data.md, "Batch composition").

    A class is *ready* once it holds `samples_per_class` rows. With `slots = rows // samples_per_class`:
    as soon as `slots` classes are ready the batch takes the `slots` that became ready first; if 2 or
    more (but fewer than `slots`) classes are ready and they hold REUSE_FACTOR batches of rows, the batch
    takes all of them. Rows are split over the chosen classes as evenly as their buffers allow
    (round-robin, one row at a time), so every class gets >= samples_per_class rows. Classes that have
    not filled are evicted oldest-first when they hold more than `max_buffered_rows` rows together; ready
    classes hold < REUSE_FACTOR batches of rows (a lone ready class drops its oldest rows beyond that)."""

    def __init__(
        self,
        shuffler: _Shuffler,
        rows_per_step: int,
        samples_per_class: int,
        max_buffered_rows: int,
        state: dict | None,
    ):
        self.shuffler = shuffler
        self.rows = rows_per_step
        self.spc = max(int(samples_per_class), 1)
        self.max_rows = int(max_buffered_rows)
        if self.rows // self.spc < 2:
            raise DataError(
                f"a batch of {self.rows} rows per rank cannot hold two classes of samples_per_class={self.spc} rows"
            )
        if self.max_rows < self.spc:
            raise DataError(
                f"max_buffered_rows={self.max_rows} is smaller than samples_per_class={self.spc}: "
                f"no class could ever fill"
            )
        self.should_stop: Callable[[], bool] = lambda: False  # the stream's close() sets this
        self.classes_filled = 0  # classes that reached samples_per_class rows (progress, for stall detection)
        self.buffers: OrderedDict[Any, list[str]] = OrderedDict()
        self.ready: deque = deque()
        self.classes_evicted = self.rows_evicted = 0
        if state:
            self.buffers = OrderedDict((label, list(texts)) for label, texts in state["classes"])
            self.ready = deque(state["ready"])
            self.classes_evicted, self.rows_evicted = state["classes_evicted"], state["rows_evicted"]
        self.ready_set = set(self.ready)
        # texts waiting in each class: a row read again (next epoch) while its first copy still waits is
        # dropped, so a class fills with distinct rows only and a positive is never a copy of its anchor
        self.waiting: dict[Any, set[str]] = {label: set(texts) for label, texts in self.buffers.items()}
        self.total = sum(len(t) for t in self.buffers.values())
        self.ready_rows = sum(len(self.buffers[label]) for label in self.ready)

    def _add(self, text: str, label: Any) -> None:
        texts = self.buffers.get(label)
        if texts is None:
            texts = self.buffers[label] = []
            self.waiting[label] = set()
        waiting = self.waiting[label]
        if text in waiting:
            return
        texts.append(text)
        waiting.add(text)
        self.total += 1
        if label in self.ready_set:
            self.ready_rows += 1
            if len(self.ready) == 1 and len(texts) > REUSE_FACTOR * self.rows:
                waiting.discard(texts.pop(0))  # one class alone cannot make a batch: keep only its newest rows
                self.total -= 1
                self.ready_rows -= 1
                self.rows_evicted += 1
        elif len(texts) >= self.spc:
            self.ready.append(label)
            self.ready_set.add(label)
            self.classes_filled += 1
            self.ready_rows += len(texts)
        while self.total - self.ready_rows > self.max_rows and self._evict_one():
            pass

    def _evict_one(self) -> bool:
        for label, texts in self.buffers.items():
            if label not in self.ready_set:
                del self.buffers[label]
                del self.waiting[label]
                self.total -= len(texts)
                self.classes_evicted += 1
                self.rows_evicted += len(texts)
                return True
        return False

    def _take(self, labels: list) -> tuple[list[str], list[Any]]:
        counts = [0] * len(labels)
        sizes = [len(self.buffers[label]) for label in labels]
        remaining = self.rows
        while remaining:
            progressed = False
            for i in range(len(labels)):
                if remaining and counts[i] < sizes[i]:
                    counts[i] += 1
                    remaining -= 1
                    progressed = True
            if not progressed:
                break
        texts, out_labels = [], []
        for label, n in zip(labels, counts):
            buf = self.buffers[label]
            texts += buf[:n]
            out_labels += [label] * n
            self.waiting[label].difference_update(buf[:n])
            del buf[:n]
            self.total -= n
            self.ready_rows -= n
            if not buf:
                del self.buffers[label]
                del self.waiting[label]
            if len(buf) >= self.spc:
                self.ready.append(label)
            else:
                self.ready_set.discard(label)
                self.ready_rows -= len(buf)
        return texts, out_labels

    def next_batch(self) -> tuple[list[str], list[Any]]:
        slots = self.rows // self.spc
        mark: tuple[int, int] | None = None  # (raw epoch, classes filled) once the shuffle buffer has turned over
        rows_read = 0
        while True:
            if len(self.ready) >= slots:
                return self._take([self.ready.popleft() for _ in range(slots)])
            if len(self.ready) >= 2 and self.ready_rows >= REUSE_FACTOR * self.rows:
                chosen = list(self.ready)
                self.ready.clear()
                return self._take(chosen)
            if rows_read == self.shuffler.size:
                mark = (self.shuffler.raw.epoch, self.classes_filled)
            if (
                mark is not None
                and len(self.ready) < 2
                and self.shuffler.raw.epoch - mark[0] >= STALL_EPOCHS
                and self.classes_filled == mark[1]
            ):
                # passes over the data and no class filled up: two never will
                raise DataError(
                    f"cannot form class-balanced batches: {STALL_EPOCHS} passes over the data filled no new class "
                    f"to samples_per_class={self.spc} distinct rows and fewer than 2 are ready ({self.classes_evicted} classes "
                    f"evicted, max_buffered_rows={self.max_rows}); is data.label_column a real class "
                    f"(not a unique id), does the corpus hold 2 or more classes, or should "
                    f"data.samples_per_class be smaller or data.max_buffered_rows larger?"
                )
            rows_read += 1
            if rows_read % STOP_CHECK_ROWS == 0 and self.should_stop():
                raise _Stopped
            text, label = self.shuffler.next_row()
            self._add(text, label)

    def state(self) -> dict:
        return {
            "classes": [[label, list(texts)] for label, texts in self.buffers.items()],
            "ready": list(self.ready),
            "classes_evicted": self.classes_evicted,
            "rows_evicted": self.rows_evicted,
        }


class _Assembler:
    """Rows of the next batch and the full stream state right after it (runs in the reader thread).

    Copying every buffer after every batch would cost O(buffered rows) per batch (far too slow with
    200k buffered rows), so the state is the last full snapshot plus the number of batches assembled
    since; a snapshot is taken once the rows emitted since the last one reach the rows buffered, and
    resuming re-assembles (without tokenising) at most that many rows."""

    def __init__(self, data: Any, rows_per_step: int, seed: int, rank: int, world_size: int, state: dict | None):
        self.identity = {
            "version": STATE_VERSION,
            "source": _fingerprint(data),
            "seed": seed,
            "rank": rank,
            "world_size": world_size,
        }
        if state is not None:
            state = _state_for_rank(state, rank)
            for key, value in self.identity.items():
                if state.get(key) != value:
                    raise DataError(
                        f"the saved data-stream state does not match this run ({key}: saved "
                        f"{state.get(key)!r}, now {value!r})"
                    )
        replay = (state or {}).get("replay", 0)
        replay_rows = (state or {}).get("replay_rows_per_step", rows_per_step)
        state = (state or {}).get("snapshot") or {}
        self.raw = _RawRows(data, seed, rank, world_size, state.get("raw"))
        self.shuffler = _Shuffler(self.raw, data.shuffle_buffer, seed * 1_000_003 + rank, state.get("shuffle"))
        # pairs and triplets: every row is its own group, made of all its texts (see _assemble)
        self.grouped = self.raw.cols.layout != "labelled"
        self.group_rows = len(self.raw.cols.names)
        self.pair_count: int = state.get("pairs", 0)  # groups made so far: part of each group's label
        self.rank = rank
        self.batcher = (
            None
            if self.grouped
            else _Batcher(
                self.shuffler, rows_per_step, data.samples_per_class, data.max_buffered_rows, state.get("classes")
            )
        )
        self.rows = rows_per_step
        if self.grouped and rows_per_step < self.group_rows:
            raise DataError(
                f"a {self.raw.cols.layout} batch needs at least {self.group_rows} rows per rank "
                f"(one group), got {rows_per_step}"
            )
        self._snapshot: dict | None = None
        self._replay = 0
        self._rows_since_snapshot = 0
        if replay:  # re-assemble (without tokenising) the batches made since the saved snapshot
            self._set_rows(replay_rows)
            for _ in range(replay):
                self._assemble()
            self._set_rows(rows_per_step)
        self._take_snapshot()

    def _set_rows(self, rows: int) -> None:
        self.rows = rows
        if self.batcher is not None:
            self.batcher.rows = rows

    def _take_snapshot(self) -> None:
        self._snapshot = {
            "raw": self.raw.state(),
            "shuffle": self.shuffler.state(),
            "classes": self.batcher.state() if self.batcher else None,
            "pairs": self.pair_count,
        }
        self._replay = self._rows_since_snapshot = 0

    def _buffered(self) -> int:
        classes = self.batcher.total if self.batcher else 0
        return classes + len(self.shuffler.buffer) + len(self.raw.pending) - self.raw.cursor

    def next(self) -> tuple[list[str], list[int], dict]:
        texts, ids = self._assemble()
        self._replay += 1
        self._rows_since_snapshot += len(texts)
        if self._rows_since_snapshot >= self._buffered():
            self._take_snapshot()  # amortised: copies the buffers at most once per row emitted
        return texts, ids, self.state()

    def _assemble(self) -> tuple[list[str], list[int]]:
        if not self.grouped:
            texts, labels = self.batcher.next_batch()
            return texts, [_label_id(label) for label in labels]
        # A group's anchor and positive share one label, new for every group; each given negative gets a
        # label of its own, so mining pairs it with nobody (never an anchor or a positive) and it is a
        # negative of every anchor in the batch, even when its text equals another group's positive.
        texts, ids = [], []
        for _ in range(self.rows // self.group_rows):
            anchor, positive, *negatives = self.shuffler.next_row()
            group = ("pair", self.rank, self.pair_count)
            self.pair_count += 1
            texts += [anchor, positive, *negatives]
            ids += [_label_id(group)] * 2 + [_label_id(("negative", *group, j)) for j in range(len(negatives))]
        return texts, ids

    def state(self) -> dict:
        """The last full snapshot (shared, never mutated) and how many batches to re-assemble after it."""
        return {**self.identity, "snapshot": self._snapshot, "replay": self._replay, "replay_rows_per_step": self.rows}


def _fingerprint(data: SourceConfig) -> str:
    """The source a stream state belongs to: resuming on another source is refused."""
    fields = source_fields(data)
    if data.layout != "triplets":  # states saved before triplets existed match
        del fields["negative_columns"]
    return json.dumps(fields, sort_keys=True, default=str)


def _state_for_rank(state: dict, rank: int) -> dict:
    """Accept one rank's state, or {"per_rank": [state of rank 0, state of rank 1, ...]}."""
    if "per_rank" in state:
        per_rank = state["per_rank"]
        if rank >= len(per_rank):
            raise DataError(f"the saved data-stream state has {len(per_rank)} ranks, this is rank {rank}")
        return per_rank[rank]
    return state


# ----------------------------------------------------------------------------- tokenisation

POLL_SECONDS = 0.1  # how often a wait for data checks for a stop request or a dead worker
CLOSE_SECONDS = 2.0  # close() waits this long for workers and the reader thread, then kills


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _encode(tokenizer, texts: list[str], max_length: int):
    """Unpadded: the rows' ids back to back, their lengths and the padding id (see `pad_ragged`)."""
    import numpy as np

    rows = tokenizer(
        texts, truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=False
    )["input_ids"]
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths, int(tokenizer.pad_token_id or 0)


def _die_with_parent(parent_pid: int) -> None:
    """A worker must not outlive a trainer killed with SIGKILL: it holds a tokenizer (hundreds of MB)
    and keeps the multiprocessing resource tracker alive. On Linux the kernel kills it when the
    trainer dies (PR_SET_PDEATHSIG); everywhere a thread also watches the parent's pid."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the trainer died before the above took effect
        os._exit(0)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="tripletctl-parent-watch", daemon=True).start()


def _worker_main(tokenizer_path: str, requests: Any, replies: Any, parent_pid: int) -> None:
    """One tokenizer worker: (texts, max_length) in, ("ok", token ids, lengths, pad id) or ("error", text) out, in order.
    Ends when the request pipe closes (the stream closed, or the trainer died)."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's: it checkpoints, then closes us
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    try:
        tokenizer, failure = _load_tokenizer(tokenizer_path), None
    except Exception as error:  # answered to every request, so the trainer reports it as bad input
        tokenizer, failure = None, f"cannot load the tokenizer {tokenizer_path}: {_one_line(error)}"
    while True:
        try:
            texts, max_length = requests.recv()
        except (EOFError, OSError):
            return
        try:
            reply = ("error", failure) if failure else ("ok", *_encode(tokenizer, texts, max_length))
        except Exception as error:
            reply = ("error", f"tokenisation failed in a worker process: {_one_line(error)}")
        try:
            replies.send(reply)
        except OSError:
            return


class StreamInterrupted(Exception):
    """The wait for the next batch ended because the caller asked to stop (Ctrl-C / SIGTERM)."""


class _TokenizerPool:
    """Worker processes with their own pair of pipes: batch k goes to worker k % n and its reply comes
    back on that worker's pipe, so replies stay in order.

    Not ProcessPoolExecutor: when one of its workers is killed half-way through sending a result, its
    manager thread blocks for ever in recv() on the half message (the parent holds the pipe's write
    end, so no end-of-file comes), futures never resolve and shutdown() joins that thread: training
    hangs and SIGTERM cannot stop it. Here the parent holds no write end of a reply pipe, so a dead
    worker reads as end-of-file, and waits also watch each worker's sentinel."""

    def __init__(self, workers: int, tokenizer_path: str):
        context = multiprocessing.get_context("spawn")
        self._workers: list[tuple[Any, Any, Any]] = []  # (process, request writer, reply reader)
        self._next = 0
        try:
            for i in range(workers):
                request_reader, request_writer = context.Pipe(duplex=False)
                reply_reader, reply_writer = context.Pipe(duplex=False)
                process = context.Process(
                    target=_worker_main,
                    name=f"tripletctl-tokenizer-{i}",
                    daemon=True,
                    args=(tokenizer_path, request_reader, reply_writer, os.getpid()),
                )
                process.start()
                request_reader.close()  # the worker's ends: keeping them would hide its death
                reply_writer.close()
                self._workers.append((process, request_writer, reply_reader))
        except BaseException:
            self.kill()
            raise

    def submit(self, texts: list[str], max_length: int) -> int:
        """Send a batch to the next worker; returns the ticket to pass to `result`."""
        index = self._next
        self._next = (index + 1) % len(self._workers)
        try:
            self._workers[index][1].send((texts, max_length))
        except OSError:  # broken pipe: that worker is gone
            raise self._died(index) from None
        return index

    def result(self, index: int, should_stop: Callable[[], bool]) -> tuple[Any, Any]:
        process, _, replies = self._workers[index]
        while True:
            if should_stop():
                raise StreamInterrupted
            ready = multiprocessing.connection.wait([replies, process.sentinel], timeout=POLL_SECONDS)
            if replies in ready:
                try:
                    reply = replies.recv()
                except (EOFError, OSError):  # end-of-file or a reply cut off by the worker's death
                    raise self._died(index) from None
                if reply[0] == "error":
                    raise DataError(reply[1])
                return tuple(reply[1:])  # (token ids back to back, lengths, pad id)
            if ready:  # the sentinel alone: dead with nothing left to read
                raise self._died(index)

    def _died(self, index: int) -> WorkerDiedError:
        process = self._workers[index][0]
        process.join(timeout=1.0)
        code = process.exitcode
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"signal {-code}"
            if -code == signal.SIGKILL:
                how += ", e.g. by `kill -9` or the out-of-memory killer"
        else:
            how = f"exit code {code}" if code is not None else "its pipe broke"
        return WorkerDiedError(f"tokenizer worker process {process.pid} died ({how})")

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """End-of-file to every worker, a short wait, then SIGKILL for any still running: never blocks."""
        for _, requests, _ in self._workers:
            requests.close()
        deadline = time.monotonic() + timeout
        for process, _, _ in self._workers:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        for process, requests, replies in self._workers:
            if process.exitcode is None:
                process.kill()
                process.join(timeout=1.0)
            requests.close()
            replies.close()


# ----------------------------------------------------------------------------- the stream

_STOP = object()


class BatchStream:
    """Infinite iterator of class-balanced, tokenised batches for one phase's batch size.

    A reader thread assembles batches and hands their texts to `tokenizer_workers` processes; up to
    `prefetch_batches` finished batches wait in a queue so the trainer does not wait for data.
    `should_stop` (polled while waiting for a batch) ends a wait with `StreamInterrupted`; a dead
    worker ends it with `WorkerDiedError`, within POLL_SECONDS."""

    def __init__(
        self,
        data: Any,
        tokenizer_path: str,
        batch_size: int,
        seed: int,
        state: dict | None = None,
        rank: int = 0,
        world_size: int = 1,
        should_stop: Callable[[], bool] | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"bad rank {rank} for world size {world_size}")
        self.data = data
        self.tokenizer_path = str(tokenizer_path)
        self.rows_per_step = batch_size // world_size
        self.max_length = int(data.max_length)
        self.workers = int(getattr(data, "tokenizer_workers", 1))
        self.prefetch = max(int(getattr(data, "prefetch_batches", 2)), 1)
        self._assembler = _Assembler(data, self.rows_per_step, seed, rank, world_size, state)
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._should_stop = should_stop or (lambda: False)
        self._thread: threading.Thread | None = None
        self._pool: _TokenizerPool | None = None
        self._tokenizer = None
        self._pin = torch.cuda.is_available()
        self._closed = False

    # -- producer side (reader thread)
    def _start(self) -> None:
        if self.workers > 0:  # started from the consumer's thread: PR_SET_PDEATHSIG follows that thread
            self._pool = _TokenizerPool(self.workers, self.tokenizer_path)
        else:
            self._tokenizer = _load_tokenizer(self.tokenizer_path)
        self._thread = threading.Thread(target=self._produce, name="tripletctl-data", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        if self._assembler.batcher is not None:
            self._assembler.batcher.should_stop = self._stop.is_set
        try:
            while not self._stop.is_set():
                texts, ids, state = self._assembler.next()
                if self._pool is not None:
                    encoded: Any = _Ticket(self._pool.submit(texts, self.max_length))
                else:
                    encoded = _encode(self._tokenizer, texts, self.max_length)
                counters = (
                    self._assembler.raw.rows_read,
                    self._assembler.raw.rows_skipped,
                    self._assembler.batcher.classes_evicted if self._assembler.batcher else 0,
                    self._assembler.batcher.rows_evicted if self._assembler.batcher else 0,
                    self._assembler.raw.epoch,
                )
                if not self._put((texts, ids, state, encoded, counters)):
                    return
        except _Stopped:
            return
        except BaseException as error:  # hand every failure to the consumer, which re-raises it
            if not self._stop.is_set():
                self._put(error)

    # -- consumer side
    def __iter__(self) -> Iterator[Batch]:
        return self

    def _next_item(self) -> Any:
        while True:
            if self._closed:
                raise StopIteration
            if self._should_stop():
                raise StreamInterrupted
            try:
                return self._queue.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        if self._thread is None:
            self._start()
        item = self._next_item()
        if isinstance(item, BaseException):
            self.close()
            if isinstance(item, TripletctlError):
                raise item
            raise DataError(f"reading the data stream failed: {_one_line(item)}") from item
        texts, ids, state, encoded, (rows_seen, skipped, evicted, rows_evicted, epoch) = item
        if isinstance(encoded, _Ticket):
            try:
                encoded = self._pool.result(encoded.worker, self._should_stop)
            except TripletctlError:
                self.close()
                raise
        flat, lengths, pad_id = encoded
        token_ids, lengths = torch.from_numpy(flat), torch.from_numpy(lengths)
        labels = torch.tensor(ids, dtype=torch.int64)
        if self._pin:
            token_ids, lengths, labels = token_ids.pin_memory(), lengths.pin_memory(), labels.pin_memory()
        return Batch(
            token_ids=token_ids,
            lengths=lengths,
            labels=labels,
            state=state,
            pad_id=pad_id,
            rows_seen=rows_seen,
            rows_skipped=skipped,
            classes_evicted=evicted,
            texts=texts,
            epoch=epoch,
            rows_evicted=rows_evicted,
        )

    def close(self) -> None:
        """Stops the reader thread and the worker processes; safe to call twice, never blocks for
        long (a worker that does not end within CLOSE_SECONDS is killed)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._drain_until_reader_ends(CLOSE_SECONDS)
        if self._pool is not None:
            self._pool.close()  # also unblocks a reader thread stuck sending to a worker
        self._drain_until_reader_ends(CLOSE_SECONDS)

    def _drain_until_reader_ends(self, timeout: float) -> None:
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # Only what cannot block: a __del__ swallows every exception, Ctrl-C included.
        pool = getattr(self, "_pool", None)
        if pool is not None and not getattr(self, "_closed", True):
            pool.kill()


@dataclass(frozen=True)
class _Ticket:
    worker: int  # which worker's pipe the batch's tokens come back on


# ----------------------------------------------------------------------------- checks and eval rows


def _negative_columns_in(names: list[str], config: SourceConfig) -> list[str]:
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
        negatives = _negative_columns_in(names, config)
        if not negatives:
            return "layout pairs would fit"
        if tuple(negatives) == tuple(config.negative_columns):
            return "layout triplets would fit"
        return f"layout triplets with negative columns {', '.join(negatives)} would fit"
    if config.text_column in names and config.label_column in names:
        return "layout labelled would fit"
    return (
        "no layout fits with the column names set: name them (text/label columns for labelled; "
        "anchor/positive/negative columns for pairs and triplets)"
    )


def _check_columns(ds, cols: _Columns, config: SourceConfig, label: str) -> None:
    """The layout's columns exist, and pairs would not silently drop a negative column: else one line
    naming the columns found and the layout that would fit them."""
    names = _column_names(ds)
    if names is None:
        try:
            first = next(iter(ds.take(1)), None)
        except Exception as error:
            raise DataError(f"reading data source '{label}' failed: {_one_line(error)}") from error
        names = list(first) if first else None
    if names is None:
        return  # empty: the usable-rows check reports it
    missing = [c for c in cols.names if c not in names]
    if missing:
        kind = "column" if len(missing) == 1 else "columns"
        problem = f"{kind} {', '.join(repr(c) for c in missing)} not found"
    elif cols.layout == "pairs" and _negative_columns_in(names, config):
        dropped = _negative_columns_in(names, config)
        problem = (
            f"layout pairs would drop the negative column{'s' if len(dropped) > 1 else ''} "
            f"{', '.join(repr(c) for c in dropped)}"
        )
    else:
        return
    raise DataError(
        f"data source '{label}' does not fit layout {cols.layout}: {problem}; available columns: "
        f"{', '.join(names)}; {_fitting_layout(names, config)}"
    )


def _open_checked(config: SourceConfig) -> tuple[_Source, _Columns, Any]:
    src = _resolve(config.source, config.format)
    cols = _Columns.of(config, src)
    ds = _load(src, config.split, dict(config.load_dataset or {}), None)
    _check_columns(ds, cols, config, src.label)
    return src, cols, ds


def check_source(data: SourceConfig) -> None:
    """Fail before training, with one line, when the source cannot feed a run: unreachable, columns
    that do not fit the layout (the existing ones are listed), or no usable row among the first
    CHECK_ROWS."""
    src, cols, ds = _open_checked(data)
    read = good = 0
    try:
        for chunk in ds.iter(batch_size=CHUNK_ROWS):
            rows, n, _ = _rows_of_chunk(chunk, cols)
            read += n
            good += len(rows)
            if good or read >= CHECK_ROWS:
                break
    except Exception as error:
        raise DataError(f"reading data source '{src.label}' failed: {_one_line(error)}") from error
    if read == 0:
        raise DataError(f"data source '{src.label}' has no rows")
    if good == 0:
        what = "text or label" if cols.layout == "labelled" else "text"
        raise DataError(
            f"no usable rows in the first {read} rows of '{src.label}' (all have a missing or "
            f"empty {what}: columns {', '.join(map(repr, cols.names))})"
        )


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
    step = 1 if cols.layout == "labelled" else len(cols.names)
    try:
        for chunk in ds.iter(batch_size=CHUNK_ROWS):
            rows, _, bad = _rows_of_chunk(chunk, cols)
            skipped += bad
            for row in rows:
                if limit is not None and len(texts) + step > limit:
                    return LabelledRows(texts, labels, skipped, triplets)
                if cols.layout == "labelled":
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
        raise DataError(f"reading data source '{src.label}' failed: {_one_line(error)}") from error
    return LabelledRows(texts, labels, skipped, triplets)
