"""tripletctl/data/neighbours.py: which ready classes share a neighbour batch, checked against a
brute-force reference over every pair of classes; the snapshot version a batch uses; the board."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest

from tripletctl.data.neighbours import CentroidBoard, Snapshot, Stopped, choose_classes, version_for_batch


def _snapshot(vectors: dict[int, list[float]]) -> Snapshot:
    ids = np.array(list(vectors), dtype=np.int64)
    v = np.array(list(vectors.values()), dtype=np.float32)
    return Snapshot(ids, v / np.linalg.norm(v, axis=1, keepdims=True))


def _reference(ready, vectors, n_classes, share, group):
    """The rule written out with python loops and cosines of every pair."""

    def cos(a, b):
        a, b = np.asarray(vectors[a], float), np.asarray(vectors[b], float)
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    n_random = n_classes - int(round(share * n_classes))
    chosen = list(range(n_random))
    while len(chosen) < n_classes:
        remaining = [i for i in range(len(ready)) if i not in chosen]
        seeds = [i for i in remaining if ready[i] in vectors]
        if not seeds:
            chosen += remaining[: n_classes - len(chosen)]
            break
        seed, others = seeds[0], seeds[1:]
        others.sort(key=lambda i: -cos(ready[seed], ready[i]))  # stable: older first on ties
        chosen += [seed] + others[: min(group, n_classes - len(chosen)) - 1]
    return chosen


def test_groups_are_the_nearest_ready_classes_by_cosine():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n_ready = int(rng.integers(4, 40))
        ready = [int(c) for c in rng.choice(1000, size=n_ready, replace=False)]
        with_centroid = [c for c in ready if rng.random() < 0.7]
        vectors = {c: rng.normal(size=8).tolist() for c in with_centroid + [5000, 5001]}  # + classes not ready
        n_classes = int(rng.integers(2, n_ready + 1))
        share, group = float(rng.choice([0.25, 0.5, 1.0])), int(rng.integers(2, 6))
        got = choose_classes(ready, _snapshot(vectors), n_classes, share, group)
        assert got == _reference(ready, vectors, n_classes, share, group), trial
        assert len(set(got)) == len(got) == n_classes


def test_a_group_holds_a_class_and_its_nearest_neighbours():
    # two clusters on the circle: 1, 2, 3 near 0°, 10, 11, 12 near 180°; oldest-first order mixes them
    vectors = {1: [1, 0.01], 10: [-1, 0.02], 2: [1, 0.03], 11: [-1, -0.01], 3: [1, -0.02], 12: [-1, 0.0]}
    ready = list(vectors)
    got = choose_classes(ready, _snapshot(vectors), 6, share=1.0, group=3)
    assert [ready[i] for i in got] == [1, 2, 3, 10, 12, 11]


def test_classes_without_a_centroid_fill_at_random_and_no_snapshot_is_a_random_batch():
    assert choose_classes([7, 8, 9, 6], Snapshot.empty(), 3, share=0.5, group=2) == [0, 1, 2]
    vectors = {9: [1, 0], 6: [1, 0.1]}
    assert choose_classes([7, 8, 9, 6, 5], _snapshot(vectors), 4, share=0.5, group=4) == [0, 1, 2, 3]
    # one group of two with centroids, then the oldest remaining class without one
    assert choose_classes([7, 9, 8, 6, 5], _snapshot(vectors), 4, share=0.75, group=2) == [0, 1, 3, 2]


def test_version_for_batch_lags_at_least_one_refresh():
    refresh = 5
    for index in range(100):
        version = version_for_batch(index, refresh)
        published_after = version * refresh  # batches the trainer had consumed when it published it
        assert version == 0 or index - published_after >= refresh
        assert index - published_after < 2 * refresh
    assert [version_for_batch(i, 2) for i in range(8)] == [0, 0, 0, 0, 1, 1, 2, 2]


def test_board_waits_for_a_version_and_drops_old_ones():
    board = CentroidBoard()
    snap = Snapshot.empty()
    got = []
    reader = threading.Thread(target=lambda: got.append(board.get(3)))
    reader.start()
    time.sleep(0.1)
    assert not got
    board.publish(3, snap)
    reader.join(timeout=5)
    assert got == [snap]
    board.publish(1, snap)
    board.publish(2, snap)
    board.keep_from(2)
    assert sorted(board.versions()) == [2, 3]
    with pytest.raises(Stopped):
        board.get(1, should_stop=lambda: True)


def test_memory_is_classes_times_dim():
    """A 20,000-class snapshot: choosing a batch never builds a classes × classes matrix."""
    rng = np.random.default_rng(1)
    ids = np.arange(20_000, dtype=np.int64)
    v = rng.normal(size=(20_000, 16)).astype(np.float32)
    snap = Snapshot(ids, v / np.linalg.norm(v, axis=1, keepdims=True))
    ready = list(itertools.islice(rng.permutation(20_000).tolist(), 2_000))
    got = choose_classes(ready, snap, 128, share=0.5, group=4)
    assert len(set(got)) == 128
