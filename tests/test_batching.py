"""batching.py on plain Python lists: shuffle conservation, class balance, eviction, groups, stop, resume."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from helpers import ListRows, labelled

from tripletctl.core.errors import DataError
from tripletctl.data.batching import STALL_EPOCHS, STOP_CHECK_ROWS, ClassBatcher, GroupBatcher, Shuffler, Stopped


def class_of(text: str) -> int:
    return int(text.split()[0][1:])


def roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))


# ------------------------------------------------------------------------------ shuffler


@pytest.mark.parametrize("size", [1, 7, 64])
def test_the_shuffler_emits_every_row_read_exactly_once(size):
    source = ListRows([[i] for i in range(10_000)])
    shuffler = Shuffler(source, size, seed=3)
    out = [shuffler.next_row()[0] for _ in range(500)]
    assert len(set(out)) == len(out)  # nothing twice
    assert sorted(out + [row[0] for row in shuffler.buffer]) == list(range(source.position))  # nothing lost
    if size == 1:
        assert out == list(range(500))  # a buffer of one keeps the file order
    else:
        assert out != sorted(out)


def test_the_shuffler_is_deterministic_for_a_seed_and_differs_across_seeds():
    def run(seed):
        shuffler = Shuffler(ListRows([[i] for i in range(1000)]), 32, seed)
        return [shuffler.next_row()[0] for _ in range(200)]

    assert run(5) == run(5) and run(5) != run(6)


def test_the_shuffler_state_round_trip_gives_the_same_continuation():
    source = ListRows([[i] for i in range(1000)])
    straight = Shuffler(source, 32, seed=1)
    [straight.next_row() for _ in range(100)]
    state, position = roundtrip(straight.state()), source.position
    expected = [straight.next_row() for _ in range(300)]  # crosses the epoch boundary at 1000
    resumed = Shuffler(ListRows([[i] for i in range(1000)], position), 32, seed=1, state=state)
    assert [resumed.next_row() for _ in range(300)] == expected


def test_a_smaller_buffer_after_resume_drains_without_losing_rows():
    source = ListRows([[i] for i in range(10_000)])
    big = Shuffler(source, 64, seed=0)
    out = [big.next_row()[0] for _ in range(10)]
    small = Shuffler(source, 8, seed=0, state=roundtrip(big.state()))
    position = source.position
    out += [small.next_row()[0] for _ in range(56)]  # 64 buffered rows drain down to 8 first
    assert source.position == position  # draining reads nothing
    out += [small.next_row()[0] for _ in range(100)]
    assert len(set(out)) == len(out)
    assert sorted(out + [row[0] for row in small.buffer]) == list(range(source.position))


# ------------------------------------------------------------------------------ class-balanced batches


def batches_of(batcher: ClassBatcher, n: int) -> list[tuple[list[str], list]]:
    return [batcher.next_batch() for _ in range(n)]


def test_two_classes_give_exact_halves_with_the_right_labels():
    rows = labelled(2, 50)
    batcher = ClassBatcher(Shuffler(ListRows(rows), 16, seed=0), 16, 4, 1000)
    for texts, labels in batches_of(batcher, 30):  # crosses several epochs
        assert len(texts) == 16 and sorted(Counter(labels).values()) == [8, 8]
        assert all(class_of(t) == label for t, label in zip(texts, labels))


def test_many_classes_fill_one_slot_each_with_distinct_rows():
    rows = labelled(40, 6)
    batcher = ClassBatcher(Shuffler(ListRows(rows), 50, seed=1), 32, 4, 10_000)
    for texts, labels in batches_of(batcher, 25):
        counts = Counter(labels)
        assert len(counts) == 8 and set(counts.values()) == {4}
        assert all(class_of(t) == label for t, label in zip(texts, labels))
        for label in counts:
            in_class = [t for t, lab in zip(texts, labels) if lab == label]
            assert len(set(in_class)) == len(in_class)  # a positive is never a copy of its anchor


def test_without_eviction_every_row_of_an_epoch_is_used_once():
    rows = labelled(12, 100)  # 1200 distinct rows
    source = ListRows(rows)
    batcher = ClassBatcher(Shuffler(source, 1, seed=0), 8, 4, 10_000)
    emitted = [text for texts, _ in batches_of(batcher, 20) for text in texts]
    assert source.epoch == 0
    buffered = [t for texts in batcher.buffers.values() for t in texts]
    assert len(set(emitted)) == len(emitted)
    assert sorted(emitted + buffered) == sorted(r[0] for r in rows[: source.position])


def test_eviction_bounds_the_buffers_and_is_counted():
    rows = labelled(200, 3, seed=2) + labelled(4, 60, seed=3, first=200)  # many classes too small to fill, then big
    source = ListRows(rows)
    batcher = ClassBatcher(Shuffler(source, 1, seed=0), 16, 4, 30)
    emitted = 0
    for _ in range(8):
        texts, labels = batcher.next_batch()
        emitted += len(texts)
        assert batcher.total - batcher.ready_rows <= 30
        assert min(Counter(labels).values()) >= 4 and len(texts) == 16
    assert batcher.classes_evicted > 0 and batcher.rows_evicted >= batcher.classes_evicted
    buffered = sum(len(t) for t in batcher.buffers.values())
    assert source.epoch == 0  # rows are distinct: none was dropped as a copy
    assert emitted + buffered + batcher.rows_evicted == source.position


@pytest.mark.parametrize("labels", ["one class", "unique ids"])
def test_a_corpus_that_can_never_fill_two_classes_is_an_error_not_a_hang(labels):
    rows = [[f"row {i}", "only" if labels == "one class" else f"id-{i}"] for i in range(300)]
    source = ListRows(rows)
    batcher = ClassBatcher(Shuffler(source, 16, seed=0), 16, 4, 64)
    with pytest.raises(DataError, match="cannot form class-balanced batches"):
        batcher.next_batch()
    assert source.epoch >= STALL_EPOCHS


@pytest.mark.parametrize("buffer", [1, 64, 2000])
def test_classes_that_fill_but_can_never_make_a_batch_are_an_error_not_a_hang(buffer):
    """3 classes x 40 distinct rows, batch 64, samples_per_class 4: 16 classes are needed, and reusing
    the 3 needs 128 rows; they hold 120. It used to wait for ever (3 classes were ready)."""
    source = ListRows(labelled(3, 40))
    batcher = ClassBatcher(Shuffler(source, buffer, seed=0), 64, 4, 100_000)
    with pytest.raises(
        DataError, match=r"batches of 64 rows: .* only 3 classes .* they hold 120 .*lower the phase's batch_size"
    ):
        batcher.next_batch()
    assert source.position < 120 * (STALL_EPOCHS + 2 + buffer // 120 + 1)  # a few passes, not for ever


def test_impossible_settings_are_refused():
    shuffler = Shuffler(ListRows(labelled(4, 4)), 4, seed=0)
    with pytest.raises(DataError, match="cannot hold two classes"):
        ClassBatcher(shuffler, 7, 4, 100)
    with pytest.raises(DataError, match="no class could ever fill"):
        ClassBatcher(shuffler, 16, 4, 3)


def test_the_stop_check_is_asked_while_a_batch_takes_long():
    rows = [[f"row {i}", f"c{i}"] for i in range(20_000)]  # one row per class: no batch for a long while
    source = ListRows(rows)
    batcher = ClassBatcher(Shuffler(source, 16, seed=0), 16, 4, 100_000)
    asked = []

    def should_stop() -> bool:
        asked.append(source.position)
        return len(asked) == 2

    with pytest.raises(Stopped):
        batcher.next_batch(should_stop)
    assert len(asked) == 2 and asked[1] - asked[0] == STOP_CHECK_ROWS


def test_class_batches_are_deterministic_and_resume_exactly():
    rows = labelled(30, 7, seed=4)

    def fresh(seed, position=0, shuffle=None, classes=None):
        source = ListRows(rows, position)
        return source, ClassBatcher(Shuffler(source, 20, seed, shuffle), 12, 3, 40, classes)

    source, straight = fresh(9)
    first = batches_of(straight, 10)
    state = roundtrip({"shuffle": straight.shuffler.state(), "classes": straight.state()})
    position, evicted = source.position, straight.classes_evicted
    rest = batches_of(straight, 20)  # crosses epochs (210 rows)
    _, again = fresh(9)
    assert batches_of(again, 30) == first + rest
    _, resumed = fresh(9, position, state["shuffle"], state["classes"])
    assert resumed.classes_evicted == evicted and batches_of(resumed, 20) == rest
    _, other = fresh(10)
    assert batches_of(other, 10) != first


# ------------------------------------------------------------------------------ groups (pairs, triplets)


def triplet_rows(n: int) -> list[list]:
    return [[f"a{i}", f"p{i}", f"n{i}.0", f"n{i}.1"] for i in range(n)]


def test_groups_are_whole_rows_with_anchor_and_positive_sharing_a_label():
    rows = triplet_rows(10)
    source = ListRows(rows)
    batcher = GroupBatcher(Shuffler(source, 1, seed=0), 9, "triplets", 4, rank=0, groups=0)  # 9 rows: 2 groups
    seen = []
    for _ in range(7):  # 14 groups: crosses the epoch
        texts, labels = batcher.next_batch()
        assert len(texts) == len(labels) == 8
        counts = Counter(labels)
        for i in range(0, 8, 4):
            seen.append(texts[i : i + 4])
            assert labels[i] == labels[i + 1] and counts[labels[i]] == 2
            assert counts[labels[i + 2]] == counts[labels[i + 3]] == 1 and labels[i + 2] != labels[i + 3]
    assert seen == (rows + rows)[:14]  # a buffer of one: file order, every row once per epoch
    assert batcher.groups == 14 and source.epoch == 1


def test_group_labels_differ_across_ranks_and_after_resume():
    rows = [[f"a{i}", f"p{i}"] for i in range(20)]

    def labels_of(rank, groups):
        batcher = GroupBatcher(Shuffler(ListRows(rows), 4, seed=0), 6, "pairs", 2, rank, groups)
        return [label for _ in range(3) for label in batcher.next_batch()[1]]

    rank0, rank1 = labels_of(0, 0), labels_of(1, 0)
    assert not set(rank0) & set(rank1)
    assert not set(labels_of(0, 9)) & set(rank0) and set(labels_of(0, 3)) & set(rank0)
    assert len(set(rank0)) == 9


def test_a_batch_smaller_than_a_group_is_refused():
    with pytest.raises(DataError, match="a triplets batch needs at least 4 rows per rank"):
        GroupBatcher(Shuffler(ListRows(triplet_rows(3)), 1, seed=0), 3, "triplets", 4, rank=0, groups=0)


@pytest.mark.parametrize("size", [1, 7, 60, 61, 300])  # smaller than, as large as, larger than the 60 rows
def test_each_pass_of_the_shuffler_is_every_row_once_also_across_a_resume(size):
    """The reference: a pass is a permutation of the corpus. Three passes, resumed from a JSON state
    in the middle of the second; the reader's look-ahead never leaks rows of one pass into another."""
    rows = labelled(6, 10)
    source = ListRows(rows)
    shuffler = Shuffler(source, size, seed=3)
    out, epochs = [], []
    for _ in range(100):
        out.append(shuffler.next_row())
        epochs.append(shuffler.epoch)
    state = json.loads(json.dumps(shuffler.state()))
    resumed = Shuffler(ListRows(rows, source.position), size, seed=99, state=state)
    for _ in range(80):
        out.append(resumed.next_row())
        epochs.append(resumed.epoch)
    reference = sorted(map(tuple, rows))
    for k in range(3):
        assert sorted(map(tuple, out[60 * k : 60 * (k + 1)])) == reference
        assert epochs[60 * k : 60 * (k + 1)] == [k] * 60
    if size > 1:
        assert out[:60] != out[60:120]


def test_a_neighbour_batch_waits_for_its_snapshot_and_stops_when_told():
    from tripletctl.data.neighbours import CentroidBoard, NeighbourBatches

    board = CentroidBoard()  # nothing published: the trainer has not got there
    batcher = ClassBatcher(
        Shuffler(ListRows(labelled(20, 6)), 32, seed=0),
        8,
        2,
        1000,
        neighbours=NeighbourBatches(board, share=0.5, group=2, refresh=5),
    )
    with pytest.raises(Stopped):
        batcher.next_batch(should_stop=lambda: True)
    assert batcher.batches == 0
