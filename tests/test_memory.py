"""The cross-batch memory queue against a plain Python list of the rows pushed so far, and a run with a
memory resumed mid-phase ending with the weights of one never interrupted."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import final_weights, write_curriculum

from tripletctl.config.validate import load_curriculum
from tripletctl.train.memory import EmbeddingMemory, carry_over
from tripletctl.train.run import train


def _batch(start: int, rows: int, dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose values name them: row i is [i, i, i] with label i (easy to check order)."""
    ids = torch.arange(start, start + rows)
    return ids[:, None].expand(rows, dim).double(), ids


@pytest.mark.parametrize(("size", "batches"), [(10, [4, 4, 4, 4]), (8, [3, 5, 2, 7, 1]), (5, [12, 2]), (6, [6, 6])])
def test_fifo_keeps_the_newest_rows(size, batches):
    memory = EmbeddingMemory(size, normalized=True)
    reference: list[int] = []
    start = 0
    for rows in batches:
        memory.push(*_batch(start, rows))
        reference = (reference + list(range(start, start + rows)))[-size:]
        start += rows
        e, y = memory.chronological()
        assert y.tolist() == reference
        assert e[:, 0].tolist() == [float(i) for i in reference]
        assert e.dtype == torch.float32 and y.dtype == torch.long
        # mining sees the same rows, in slot order
        slot_e, slot_y = memory.contents()
        assert sorted(slot_y.tolist()) == sorted(reference) and memory.filled == len(reference)
        assert torch.equal(slot_e[:, 0].long(), slot_y)


def test_push_detaches():
    memory = EmbeddingMemory(4, normalized=True)
    e = torch.ones(2, 3, requires_grad=True)
    memory.push(e * 2, torch.tensor([0, 1]))
    assert not memory.contents()[0].requires_grad


def test_state_dict_round_trips_through_weights_only_load(tmp_path):
    memory = EmbeddingMemory(5, normalized=False)
    for start in (0, 3, 6):
        memory.push(*_batch(start, 3))
    torch.save(memory.state_dict(), tmp_path / "memory.pt")
    state = torch.load(tmp_path / "memory.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    back = EmbeddingMemory.from_state_dict(state)
    assert (back.size, back.normalized, back.filled, back.head) == (5, False, 5, memory.head)
    assert torch.equal(back.embeddings, memory.embeddings) and torch.equal(back.labels, memory.labels)
    # both go on identically
    memory.push(*_batch(9, 2))
    back.push(*_batch(9, 2))
    assert torch.equal(back.embeddings, memory.embeddings) and torch.equal(back.labels, memory.labels)
    empty = EmbeddingMemory.from_state_dict(EmbeddingMemory(3, True).state_dict())
    assert empty.filled == 0 and empty.embeddings is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.pop("labels"),
        lambda s: s.update(filled=torch.tensor(9)),
        lambda s: s.update(size=torch.tensor(0)),
        lambda s: s.update(embeddings=torch.zeros(2, 3)),
        lambda s: s.update(head=torch.tensor(1)),  # not full: the next slot must be `filled`
    ],
)
def test_damaged_state_is_a_value_error(damage):
    memory = EmbeddingMemory(5, normalized=True)
    memory.push(*_batch(0, 3))
    state = memory.state_dict()
    damage(state)
    with pytest.raises(ValueError):
        EmbeddingMemory.from_state_dict(state)


def test_carry_over_between_phases():
    memory = EmbeddingMemory(6, normalized=True)
    memory.push(*_batch(0, 8))
    assert carry_over(memory, None, dim=3, normalized=True) is None  # a phase without memory
    assert carry_over(memory, 6, dim=3, normalized=True) is memory  # same queue goes on
    smaller = carry_over(memory, 4, dim=3, normalized=True)
    assert smaller.chronological()[1].tolist() == [4, 5, 6, 7]
    larger = carry_over(memory, 10, dim=3, normalized=True)
    assert larger.chronological()[1].tolist() == [2, 3, 4, 5, 6, 7] and larger.size == 10
    for changed in ({"dim": 4, "normalized": True}, {"dim": 3, "normalized": False}):  # cleared
        fresh = carry_over(memory, 6, **changed)
        assert fresh.filled == 0 and fresh.normalized == changed["normalized"]
    assert carry_over(None, 6, dim=3, normalized=True).filled == 0


def test_a_different_embedding_size_restarts_the_queue():
    memory = EmbeddingMemory(6, normalized=True)
    memory.push(*_batch(0, 4, dim=3))
    memory.push(*_batch(4, 2, dim=5))
    assert memory.chronological()[1].tolist() == [4, 5] and memory.dim == 5


def test_not_a_state_at_all_is_a_value_error():
    for junk in (torch.zeros(3), [1, 2], {"size": "x"}, {**EmbeddingMemory(3, True).state_dict(), "labels": [1]}):
        with pytest.raises(ValueError):
            EmbeddingMemory.from_state_dict(junk)


@pytest.mark.slow
def test_resume_with_memory_matches_uninterrupted_run(tmp_path, interrupt_after=5):
    """A cross-batch memory in every phase (from step 1 on): the checkpoint holds the queue, so a run
    interrupted in phase 1, whose queue was carried over from phase 0, ends with the same weights."""
    memory = {"size": 48, "start_step": 1}
    straight = write_curriculum(tmp_path / "straight", checkpoint_every=3, memory=memory)
    assert train(load_curriculum(straight)) == 0
    broken = write_curriculum(tmp_path / "broken", checkpoint_every=3, memory=memory)
    assert train(load_curriculum(broken), max_steps=interrupt_after) == 0
    assert train(load_curriculum(broken), resume=True) == 0

    a, b = final_weights(tmp_path / "straight" / "run"), final_weights(tmp_path / "broken" / "run")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    queue = [
        torch.load(run / "phase-2-batch-hard" / "checkpoint" / "memory.pt", weights_only=True)
        for run in (tmp_path / "straight" / "run", tmp_path / "broken" / "run")
    ]
    for key in queue[0]:
        torch.testing.assert_close(queue[0][key], queue[1][key], rtol=0, atol=1e-6, msg=key)
    # the queue fills from step 0, is mined from start_step on, and carries into the next phase
    rows = {}
    for phase_dir in sorted((tmp_path / "straight" / "run").glob("phase-*")):
        records = [json.loads(line) for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]
        rows[phase_dir.name] = [r["memory_rows"] for r in records if "event" not in r]
    assert rows == {
        "phase-0-semi-hard": [0, 16, 32, 48],
        "phase-1-hard-negative": [0, 48, 48],
        "phase-2-batch-hard": [0, 48, 48],
    }

    # the memory changes what is learnt (so the comparison above can fail)
    plain = write_curriculum(tmp_path / "plain", checkpoint_every=3)
    assert train(load_curriculum(plain)) == 0
    c = final_weights(tmp_path / "plain" / "run")
    assert any(not torch.allclose(a[name], c[name], rtol=0, atol=1e-6) for name in a)
    assert not (tmp_path / "plain" / "run" / "phase-2-batch-hard" / "checkpoint" / "memory.pt").exists()
