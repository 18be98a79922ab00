"""tripletctl/train/class_centroids.py: the running mean per class against a python loop, the
snapshots published every R batches, and a state that restores exactly (tensors only)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from tripletctl.data.neighbours import version_for_batch
from tripletctl.train.class_centroids import ClassCentroids


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(12, 5, generator=g), torch.randint(0, 150, (12,), generator=g) * 1_000_003


def test_running_mean_matches_a_loop_over_rows():
    centroids = ClassCentroids(refresh=3)
    seen: dict[int, list[np.ndarray]] = {}
    for embeddings, labels in _batches(40):  # 150 classes: the storage grows past its first 64 rows
        centroids.add(embeddings, labels)
        for row, label in zip(embeddings, labels.tolist()):
            seen.setdefault(label, []).append((row / row.norm()).numpy())
    means = centroids.means()
    assert sorted(centroids.ids) == sorted(seen)
    for label, rows in seen.items():
        np.testing.assert_allclose(means[centroids.row_of[label]].numpy(), np.mean(rows, axis=0), atol=1e-5)
    snap = centroids.snapshot()
    for label, rows in seen.items():
        expected = np.mean(rows, axis=0)
        np.testing.assert_allclose(snap.vectors[snap.row_of[label]], expected / np.linalg.norm(expected), atol=1e-5)


def test_snapshots_every_refresh_batches_and_only_those_a_batch_may_need():
    centroids = ClassCentroids(refresh=4)
    centroids.start(0, new_phase=True)
    assert sorted(centroids.board.versions()) == [0]
    for index, (embeddings, labels) in enumerate(_batches(13)):
        centroids.after_batch(index, embeddings, labels)
        if index == 11:
            classes_after_11 = list(centroids.ids)
        next_batch = index + 1
        held = sorted(centroids.board.versions())
        assert version_for_batch(next_batch, 4) in held  # the batcher never waits on a lost version
        assert len(held) <= 2
    assert sorted(centroids.board.versions()) == [2, 3]
    assert centroids.board.get(3).ids.tolist() == classes_after_11  # published after batch 11
    centroids.after_batch(13, torch.full((12, 5), float("nan")), torch.zeros(12, dtype=torch.int64))
    assert not any(np.isnan(centroids.means().numpy()).ravel())  # a non-finite step adds nothing


def test_state_restores_exactly_through_weights_only_load():
    centroids = ClassCentroids(refresh=2)
    for index, (embeddings, labels) in enumerate(_batches(7)):
        centroids.after_batch(index, embeddings, labels)
    buffer = io.BytesIO()
    torch.save(centroids.state_dict(), buffer)
    buffer.seek(0)
    restored = ClassCentroids.from_state_dict(torch.load(buffer, weights_only=True))
    assert restored.ids == centroids.ids and restored.refresh == 2
    torch.testing.assert_close(restored.means(), centroids.means())
    assert sorted(restored.board.versions()) == sorted(centroids.board.versions())
    for version, snap in centroids.board.versions().items():
        np.testing.assert_array_equal(restored.board.get(version).vectors, snap.vectors)
    for index, (embeddings, labels) in enumerate(_batches(3, seed=1), start=7):  # both go on the same way
        centroids.after_batch(index, embeddings, labels)
        restored.after_batch(index, embeddings, labels)
    torch.testing.assert_close(restored.means(), centroids.means())


def test_a_start_mid_stream_publishes_the_versions_the_next_batches_need():
    centroids = ClassCentroids(refresh=5)
    centroids.start(23, new_phase=False)  # a resume without centroids: batches 23.. need versions 3 and 4
    assert sorted(centroids.board.versions()) == [3, 4] and not len(centroids.board.get(4).ids)
    embeddings, labels = next(_batches(1))
    centroids.add(embeddings, labels)
    centroids.start(23, new_phase=False)  # a resume inside a phase keeps what it restored
    assert not len(centroids.board.get(4).ids)
    centroids.start(23, new_phase=True)  # a phase that starts uses the centroids as they are
    assert [len(centroids.board.get(v).ids) for v in (3, 4)] == [len(centroids.ids)] * 2


def test_a_damaged_state_is_a_value_error():
    good = ClassCentroids(refresh=2)
    good.after_batch(1, *next(_batches(1)))
    state = good.state_dict()
    for junk in (
        {},
        {**state, "counts": state["counts"][:-1]},
        {**state, "ids": torch.zeros(len(state["ids"]), dtype=torch.int64)},
        {k: v for k, v in state.items() if not k.endswith(".vectors")},
        {**state, "refresh": "x"},
        {**state, "refresh": torch.tensor(0)},
    ):
        with pytest.raises(ValueError):
            ClassCentroids.from_state_dict(junk)


def _neighbour_curriculum(directory):
    """The three-phase test curriculum, its later phases on neighbour classes, a snapshot every 2 batches."""
    import yaml
    from helpers import write_curriculum

    path = write_curriculum(directory, checkpoint_every=3, tokenizer_workers=1)
    spec = yaml.safe_load(path.read_text())
    spec["data"]["neighbour_refresh"] = 2
    for phase in spec["phases"][1:]:
        phase.update(batch_classes="neighbours", neighbour_share=0.5, neighbour_group=2)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow
def test_resume_with_neighbour_batches_matches_uninterrupted_run(tmp_path, interrupt_after=5):
    """Stopped in phase 1 (neighbour batches, centroids fed since phase 0), resumed: the same batches,
    metrics, centroids and weights as a straight run."""
    import json

    from helpers import final_weights

    from tripletctl.config.validate import load_curriculum
    from tripletctl.train.run import train

    straight, broken = _neighbour_curriculum(tmp_path / "straight"), _neighbour_curriculum(tmp_path / "broken")
    assert train(load_curriculum(straight)) == 0
    assert train(load_curriculum(broken), max_steps=interrupt_after) == 0
    assert train(load_curriculum(broken), resume=True) == 0
    a, b = final_weights(tmp_path / "straight" / "run"), final_weights(tmp_path / "broken" / "run")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    centroids = [
        torch.load(run / "phase-2-batch-hard" / "checkpoint" / "centroids.pt", weights_only=True)
        for run in (tmp_path / "straight" / "run", tmp_path / "broken" / "run")
    ]
    assert set(centroids[0]) == set(centroids[1]) and len(centroids[0]["ids"]) > 4
    for key in centroids[0]:
        torch.testing.assert_close(centroids[0][key], centroids[1][key], rtol=0, atol=1e-6, msg=key)
    for phase_dir in sorted((tmp_path / "straight" / "run").glob("phase-*")):
        losses = [
            [json.loads(line).get("loss") for line in (run / phase_dir.name / "metrics.jsonl").read_text().splitlines()]
            for run in (tmp_path / "straight" / "run", tmp_path / "broken" / "run")
        ]
        assert losses[0] == pytest.approx(losses[1], abs=1e-6), phase_dir.name
