"""The training stream: a seeded, resumable, infinite stream of class-balanced, tokenised batches.

The corpus is read with `datasets` in streaming mode (sources.py), so memory depends on the buffer
sizes, never on the corpus size; batching.py decides which rows make each batch. Exact resume: the
stream state is the raw read position (`IterableDataset.state_dict()`) plus every buffered row, saved
as the last full snapshot and the number of batches to re-assemble after it. A reader thread
assembles batches and tokenizer worker processes encode them. See docs/data.md for the user-facing rules.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tripletctl.config.blocks import SourceConfig, source_fields
from tripletctl.config.layouts import LAYOUT_OF
from tripletctl.core.errors import DataError, TripletctlError, one_line
from tripletctl.data.batching import ClassBatcher, GroupBatcher, Shuffler, Stopped
from tripletctl.data.neighbours import NeighbourBatches
from tripletctl.data.sources import CHUNK_ROWS, Columns, column_names, load, reading_failed, resolve, rows_of_chunk
from tripletctl.data.tokenizer import load_tokenizer
from tripletctl.data.workers import CLOSE_SECONDS, POLL_SECONDS, StreamInterrupted, TokenizerPool, encode

STATE_VERSION = 1


# ----------------------------------------------------------------------------- batches


@dataclass
class Batch:
    token_ids: torch.Tensor  # (total tokens,) int64: the rows' tokens back to back, unpadded
    lengths: torch.Tensor  # (B,) int64: tokens per row
    labels: torch.Tensor  # (B,) int64: a stable 63-bit hash of the class, equal on every rank
    state: dict  # stream state *after* this batch (JSON-serialisable)
    rows_seen: int  # cumulative rows this rank's shuffle buffer has passed on, bad ones included (not its look-ahead)
    rows_skipped: int  # cumulative bad rows (missing/empty text, missing label)
    classes_evicted: int  # cumulative classes dropped from the buffers before they filled
    texts: list[str] = field(default_factory=list)  # the rows, in batch order
    epoch: int = 0  # the pass over this rank's shard that the batch's rows come from (0 first)
    rows_evicted: int = 0  # cumulative rows dropped with evicted classes
    pad_id: int = 0  # the tokenizer's padding id
    index: int = -1  # the batch's count in the stream (0 first, across phases): which centroid snapshot it used

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


def label_id(label: Any) -> int:
    """A stable non-negative int63 per class: same class -> same id on every rank and after resume."""
    digest = hashlib.blake2b(repr((type(label).__name__, label)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ----------------------------------------------------------------------------- the resumable reader and its state


class _RawRows:
    """Good rows of this rank's shard, epoch after epoch, forever.

    Position = (epoch, `IterableDataset.state_dict()` after the last chunk read, the chunk's unread rows).
    Epoch e reads local files in an order shuffled with seed + e."""

    def __init__(self, data: Any, seed: int, rank: int, world_size: int, state: dict | None):
        self.data, self.seed, self.rank, self.world_size = data, seed, rank, world_size
        self.src = resolve(data.source, data.format)
        self.cols = Columns.of(data, self.src)
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

        ds = load(self.src, self.data.split, dict(self.data.load_dataset or {}), self.seed + self.epoch)
        names = column_names(ds)
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
                raise reading_failed(self.src, error) from error
            rows, read, skipped = rows_of_chunk(chunk, self.cols)
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


class _Assembler:
    """Rows of the next batch and the full stream state right after it (runs in the reader thread).

    Copying every buffer after every batch would cost O(buffered rows) per batch (far too slow with
    200k buffered rows), so the state is the last full snapshot plus the number of batches assembled
    since; a snapshot is taken once the rows emitted since the last one reach the rows buffered, and
    resuming re-assembles (without tokenising) at most that many rows."""

    def __init__(
        self,
        data: Any,
        rows_per_step: int,
        seed: int,
        rank: int,
        world_size: int,
        state: dict | None,
        neighbours: NeighbourBatches | None = None,
    ):
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
        choices = list(((state or {}).get("choices") or [])[:replay])  # what each batch to re-assemble chose
        state = (state or {}).get("snapshot") or {}
        self.raw = _RawRows(data, seed, rank, world_size, state.get("raw"))
        self.shuffler = Shuffler(self.raw, data.shuffle_buffer, seed * 1_000_003 + rank, state.get("shuffle"))
        self.batcher: ClassBatcher | GroupBatcher
        if not self.raw.cols.layout.grouped:
            self.batcher = ClassBatcher(
                self.shuffler,
                rows_per_step,
                data.samples_per_class,
                data.max_buffered_rows,
                state.get("classes"),
                neighbours=neighbours,
                key=label_id,
            )
        else:  # pairs and triplets: every row is its own group, made of all its texts
            self.batcher = GroupBatcher(
                self.shuffler,
                rows_per_step,
                self.raw.cols.layout.name,
                len(self.raw.cols.names),
                rank,
                state.get("pairs", 0),
            )
        self._snapshot: dict | None = None
        self._replay = 0
        self._rows_since_snapshot = 0
        if replay:  # re-assemble (without tokenising) the batches made since the saved snapshot
            self._replay_batches(replay, replay_rows, rows_per_step, choices)
        self._take_snapshot()

    def _replay_batches(self, replay: int, replay_rows: int, rows_per_step: int, choices: list) -> None:
        """Batches made before the saved state, made again: neighbour batches take the classes they
        chose then (`choices`), so no centroid snapshot is needed."""
        classes = isinstance(self.batcher, ClassBatcher)
        self.batcher.rows = replay_rows
        if classes:
            self.batcher.forced = deque(choices)
        for _ in range(replay):
            self.batcher.next_batch()
        self.batcher.rows = rows_per_step
        if classes:
            self.batcher.forced = None

    def _take_snapshot(self) -> None:
        grouped = isinstance(self.batcher, GroupBatcher)
        self._snapshot = {
            "raw": self.raw.state(),
            "shuffle": self.shuffler.state(),
            "classes": None if grouped else self.batcher.state(),
            "pairs": self.batcher.groups if grouped else 0,
        }
        self._replay = self._rows_since_snapshot = 0
        if not grouped and self.batcher.neighbours is not None:
            self.batcher.log = []  # a new list: states handed out before keep theirs

    def rows_seen(self) -> int:
        """Rows read (bad ones included) less those still waiting in the reader's chunk or the shuffle
        buffer: after one pass over N rows it is N, whatever the buffer's size (docs/data.md)."""
        waiting = len(self.raw.pending) - self.raw.cursor + len(self.shuffler.buffer) + (self.shuffler.held is not None)
        return self.raw.rows_read - waiting

    def _buffered(self) -> int:
        return self.batcher.buffered + len(self.shuffler.buffer) + len(self.raw.pending) - self.raw.cursor

    def next(self, should_stop: Callable[[], bool]) -> tuple[list[str], list[int], dict]:
        """`should_stop` ends a long assembly with `batching.Stopped`."""
        texts, labels = self.batcher.next_batch(should_stop)
        self._replay += 1
        self._rows_since_snapshot += len(texts)
        if self._rows_since_snapshot >= self._buffered():
            self._take_snapshot()  # amortised: copies the buffers at most once per row emitted
        return texts, [label_id(label) for label in labels], self.state()

    def state(self) -> dict:
        """The last full snapshot (shared, never mutated) and how many batches to re-assemble after it."""
        return {
            **self.identity,
            "snapshot": self._snapshot,
            "replay": self._replay,
            "replay_rows_per_step": self.batcher.rows,
            **({"choices": self.batcher.log} if getattr(self.batcher, "log", None) is not None else {}),
        }


def _fingerprint(data: SourceConfig) -> str:
    """The source a stream state belongs to: resuming on another source is refused."""
    fields = source_fields(data)
    if not LAYOUT_OF[data.layout].given_negatives:  # states saved before triplets existed match
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


# ----------------------------------------------------------------------------- the stream


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
        neighbours: NeighbourBatches | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"bad rank {rank} for world size {world_size}")
        self.data = data
        self.tokenizer_path = str(tokenizer_path)
        self.rows_per_step = batch_size // world_size
        self.max_length = int(data.max_length)
        self.workers = int(getattr(data, "tokenizer_workers", 1))
        self.prefetch = max(int(getattr(data, "prefetch_batches", 2)), 1)
        self._assembler = _Assembler(data, self.rows_per_step, seed, rank, world_size, state, neighbours)
        self.next_index = getattr(self._assembler.batcher, "batches", 0)  # the stream's count of its next batch
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._should_stop = should_stop or (lambda: False)
        self._thread: threading.Thread | None = None
        self._pool: TokenizerPool | None = None
        self._tokenizer = None
        self._pin = torch.cuda.is_available()
        self._closed = False

    # -- producer side (reader thread)
    def _start(self) -> None:
        if self.workers > 0:  # started from the consumer's thread: PR_SET_PDEATHSIG follows that thread
            self._pool = TokenizerPool(self.workers, self.tokenizer_path)
        else:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
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
        try:
            while not self._stop.is_set():
                texts, ids, state = self._assembler.next(should_stop=self._stop.is_set)
                if self._pool is not None:
                    encoded: Any = _Ticket(self._pool.submit(texts, self.max_length))
                else:
                    encoded = encode(self._tokenizer, texts, self.max_length)
                counters = (
                    self._assembler.rows_seen(),
                    self._assembler.raw.rows_skipped,
                    self._assembler.batcher.classes_evicted,
                    self._assembler.batcher.rows_evicted,
                    self._assembler.shuffler.epoch,
                    getattr(self._assembler.batcher, "batches", 0) - 1,
                )
                if not self._put((texts, ids, state, encoded, counters)):
                    return
        except Stopped:
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
            raise DataError(f"reading the data stream failed: {one_line(item)}") from item
        texts, ids, state, encoded, (rows_seen, skipped, evicted, rows_evicted, epoch, index) = item
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
            index=index,
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
