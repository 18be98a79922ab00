"""Which rows make a batch: a seeded shuffle buffer, then class-balanced or one-group-per-row batches.

Pure logic on Python lists: rows come from any object with `next_row()` and `epoch` (stream.py's
resumable reader in training, a plain list in tests/test_batching.py), and every object here can
say its `state()` (JSON-able) and start again from it, which is how a stream resumes exactly.
The buffers are ours, not `IterableDataset.shuffle`'s, because `datasets` cannot restore a shuffle
buffer's content. Rules in docs/data.md ("Batch composition").
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Protocol

from tripletctl.core.errors import DataError
from tripletctl.data.neighbours import NeighbourBatches, Stopped, choose_classes, version_for_batch

REUSE_FACTOR = 2  # reuse classes once the ready classes hold this many batches of rows
STOP_CHECK_ROWS = 4096  # rows read between stop checks while a batch is being assembled
STALL_EPOCHS = 3  # passes over the data with no class filling before the batcher gives up with an error
POOL_FACTOR = 4  # neighbour batches choose among up to this many batches' worth of ready classes


class Rows(Protocol):
    """An endless source of rows; `epoch` counts the passes over the data started so far, minus one."""

    epoch: int

    def next_row(self) -> list: ...


def never_stop() -> bool:
    return False


class Shuffler:
    """Reservoir-style shuffle buffer with a seeded RNG: each new row swaps out a random buffered one.

    The buffer never mixes two passes over the data: the first row of the next pass is held back
    until the buffer has emptied, so every pass emits every row exactly once, in shuffled order,
    whatever the buffer's size (a buffer larger than the corpus holds the whole corpus, never two
    copies of a row). `epoch` is the pass of the rows being emitted, not of the reader's look-ahead."""

    def __init__(self, rows: Rows, size: int, seed: int, state: dict | None = None):
        self.rows, self.size = rows, max(int(size), 1)
        self.rng = random.Random(seed)
        self.buffer: list[list] = []
        self.held: list | None = None  # the next pass's first row, read while this pass drains
        self.pass_epoch: int | None = None  # the pass the buffered rows belong to
        if state:
            self.buffer = list(state["buffer"])
            version, internal, gauss = state["rng"]
            self.rng.setstate((version, tuple(internal), gauss))
            self.held = state.get("held")
            self.pass_epoch = state.get("epoch", rows.epoch)  # a state saved before passes were kept apart

    @property
    def epoch(self) -> int:
        return self.rows.epoch if self.pass_epoch is None else self.pass_epoch

    def _take(self, i: int) -> list:
        """Remove and return buffered row `i`."""
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

    def _read(self) -> bool:
        """Read one row into the buffer (True), or hold it back when it starts the next pass (False)."""
        row = self.rows.next_row()
        if self.buffer and self.pass_epoch is not None and self.rows.epoch != self.pass_epoch:
            self.held = row
            return False
        if not self.buffer:
            self.pass_epoch = self.rows.epoch
        self.buffer.append(row)
        return True

    def next_row(self) -> list:
        if not self.buffer and self.held is not None:  # the last pass is drained: the held row starts the next
            self.buffer, self.held, self.pass_epoch = [self.held], None, self.rows.epoch
        if self.size <= 1 and not self.buffer and self.held is None:
            row = self.rows.next_row()
            self.pass_epoch = self.rows.epoch
            return row
        if len(self.buffer) > self.size or self.held is not None:  # a smaller buffer resumed, or a pass draining
            return self._take(self.rng.randrange(len(self.buffer)))
        while len(self.buffer) < self.size and self._read():
            pass
        if self.held is not None or len(self.buffer) < self.size:
            return self._take(self.rng.randrange(len(self.buffer)))
        i = self.rng.randrange(self.size)
        row = self.buffer[i]
        if self._read():  # appended at the end: move it into the emptied place
            self.buffer[i] = self.buffer.pop()
        else:  # the pass ended: the buffer shrinks from now on
            self._take(i)
        return row

    def state(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "buffer": list(self.buffer),
            "rng": [version, list(internal), gauss],
            "held": self.held,
            "epoch": self.pass_epoch,
        }


class ClassBatcher:
    """Class-balanced batches of `rows` rows from shuffled [text, label] rows (layout labelled).

    A class is *ready* once it holds `samples_per_class` rows. With `slots = rows // samples_per_class`:
    as soon as `slots` classes are ready the batch takes the `slots` that became ready first; if 2 or
    more (but fewer than `slots`) classes are ready and they hold REUSE_FACTOR batches of rows, the batch
    takes all of them. Rows are split over the chosen classes as evenly as their buffers allow
    (round-robin, one row at a time), so every class gets >= samples_per_class rows. Classes that have
    not filled are evicted oldest-first when they hold more than `max_buffered_rows` rows together; ready
    classes hold < REUSE_FACTOR batches of rows (a lone ready class drops its oldest rows beyond that)."""

    def __init__(
        self,
        shuffler: Shuffler,
        rows_per_step: int,
        samples_per_class: int,
        max_buffered_rows: int,
        state: dict | None = None,
        neighbours: NeighbourBatches | None = None,
        key: Callable[[Any], int] = hash,
    ):
        self.shuffler = shuffler
        self.neighbours, self.key = neighbours, key
        self.batches = (state or {}).get("batches", 0)  # batches made since the stream began: which snapshot
        self.log: list | None = None  # per batch made: the classes a neighbour batch chose, None for random
        self.forced: deque | None = None  # while a resume re-assembles batches: what `log` said of each
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

    @property
    def buffered(self) -> int:
        return self.total

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

    def next_batch(self, should_stop: Callable[[], bool] = never_stop) -> tuple[list[str], list[Any]]:
        """The next batch's texts and their class labels. Reading until classes fill can take long on a
        corpus of many small classes, so `should_stop` is asked every STOP_CHECK_ROWS rows (`Stopped`)."""
        slots = self.rows // self.spc
        mark: int | None = None  # the pass being emitted once the shuffle buffer has turned over
        rows_read = 0
        forced = (self.forced.popleft() if self.forced else None) if self.forced is not None else False
        neighbours = bool(forced) if forced is not False else self.neighbours is not None
        while True:
            if len(self.ready) >= slots and not neighbours:
                return self._made(None, self._take([self.ready.popleft() for _ in range(slots)]))
            if len(self.ready) >= slots and self._pool_full(slots, rows_read):
                chosen = forced or self._choose(slots, should_stop)
                chosen_set = set(chosen)
                self.ready = deque(label for label in self.ready if label not in chosen_set)
                return self._made(chosen, self._take(chosen))
            if len(self.ready) < slots and len(self.ready) >= 2 and self.ready_rows >= REUSE_FACTOR * self.rows:
                chosen = list(self.ready)
                self.ready.clear()
                return self._made(chosen if neighbours else None, self._take(chosen))
            if rows_read == self.shuffler.size:
                mark = self.shuffler.epoch
            if mark is not None and self.shuffler.epoch - mark >= STALL_EPOCHS:
                raise DataError(self._stalled(slots))  # passes over the data and no batch: none ever will
            rows_read += 1
            if rows_read % STOP_CHECK_ROWS == 0 and should_stop():
                raise Stopped
            text, label = self.shuffler.next_row()
            self._add(text, label)

    def _made(self, chosen: list | None, batch: tuple[list[str], list[Any]]) -> tuple[list[str], list[Any]]:
        """Count the batch, and log what a resume needs to make it again without the centroids."""
        self.batches += 1
        if self.log is not None:
            self.log.append(chosen)
        return batch

    def _pool_full(self, slots: int, rows_read: int) -> bool:
        """Neighbour batches choose among more ready classes than one batch takes: up to POOL_FACTOR
        batches' worth, or as many as POOL_FACTOR batches of rows (or the shuffle buffer) bring."""
        enough_rows = min(POOL_FACTOR * self.rows, self.max_rows)
        return (
            len(self.ready) >= POOL_FACTOR * slots
            or self.ready_rows >= enough_rows
            or rows_read >= min(POOL_FACTOR * self.rows, self.shuffler.size)
        )

    def _choose(self, slots: int, should_stop: Callable[[], bool]) -> list:
        """The classes of the next neighbour batch, from the centroid snapshot this batch uses."""
        nb = self.neighbours
        snapshot = nb.board.get(version_for_batch(self.batches, nb.refresh), should_stop)
        ready = list(self.ready)
        positions = choose_classes(
            [self.key(label) for label in ready], snapshot, slots, nb.share, min(nb.group, slots)
        )
        return [ready[i] for i in positions]

    def _stalled(self, slots: int) -> str:
        """Why STALL_EPOCHS passes over the data made no batch, whatever the reason, in one line."""
        if len(self.ready) < 2:
            return (
                f"cannot form class-balanced batches: {STALL_EPOCHS} passes over the data filled no new class "
                f"to samples_per_class={self.spc} distinct rows and fewer than 2 are ready ({self.classes_evicted} "
                f"classes evicted, max_buffered_rows={self.max_rows}); is data.label_column a real class "
                f"(not a unique id), does the corpus hold 2 or more classes, or should "
                f"data.samples_per_class be smaller or data.max_buffered_rows larger?"
            )
        return (
            f"cannot form class-balanced batches of {self.rows} rows: after {STALL_EPOCHS} passes over the data "
            f"only {len(self.ready)} classes hold samples_per_class={self.spc} distinct rows ({slots} needed), "
            f"and reusing them needs {REUSE_FACTOR * self.rows:,} distinct rows, they hold {self.ready_rows:,} "
            f"({self.classes_evicted} classes evicted, max_buffered_rows={self.max_rows}); lower the phase's "
            f"batch_size (or data.samples_per_class), or add data"
        )

    def state(self) -> dict:
        return {
            "classes": [[label, list(texts)] for label, texts in self.buffers.items()],
            "ready": list(self.ready),
            "classes_evicted": self.classes_evicted,
            "rows_evicted": self.rows_evicted,
            "batches": self.batches,
        }


class GroupBatcher:
    """Batches of whole rows for layouts pairs and triplets: every row is its own group of texts.

    A group's anchor and positive share one label, new for every group; each given negative gets a
    label of its own, so mining pairs it with nobody (never an anchor or a positive) and it is a
    negative of every anchor in the batch, even when its text equals another group's positive. Labels
    hold the rank and a running group count, so they differ across ranks and after a resume."""

    classes_evicted = rows_evicted = 0  # groups are never buffered, so never evicted
    buffered = 0

    def __init__(self, shuffler: Shuffler, rows_per_step: int, layout: str, group_size: int, rank: int, groups: int):
        if rows_per_step < group_size:
            raise DataError(
                f"a {layout} batch needs at least {group_size} rows per rank (one group), got {rows_per_step}"
            )
        self.shuffler, self.rows, self.group_size, self.rank = shuffler, rows_per_step, group_size, rank
        self.groups = groups  # groups made so far: part of each group's label

    def next_batch(self, should_stop: Callable[[], bool] = never_stop) -> tuple[list[str], list[Any]]:
        """`rows // group_size` whole groups; reads exactly that many rows, so it never waits on `should_stop`."""
        texts: list[str] = []
        labels: list[Any] = []
        for _ in range(self.rows // self.group_size):
            anchor, positive, *negatives = self.shuffler.next_row()
            group = ("pair", self.rank, self.groups)
            self.groups += 1
            texts += [anchor, positive, *negatives]
            labels += [group] * 2 + [("negative", *group, j) for j in range(len(negatives))]
        return texts, labels
