"""The learning-rate schedule (tripletctl/train/lr.py `get_lr`): warm-up, then decay."""

from __future__ import annotations

import pytest

from tripletctl.config.blocks import PhaseConfig
from tripletctl.train.lr import get_lr


def test_get_lr_warms_up_then_decays_to_zero():
    phase = PhaseConfig(
        name="p",
        mining="batch-hard",
        batch_size=8,
        steps=10,
        margin=0.2,
        lr=1.0,
        warmup_steps=4,
        distance="euclidean",
        fallback="hardest",
        chunk_size=8,
        on_collapse="warn",
    )
    warm = [get_lr(s, phase, "linear") for s in range(4)]
    assert warm == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert get_lr(4, phase, "linear") == pytest.approx(1.0)
    assert get_lr(9, phase, "linear") == pytest.approx(1.0 - 5 / 6)
    assert get_lr(7, phase, "none") == 1.0
    assert get_lr(4, phase, "cosine") == pytest.approx(1.0)
    assert get_lr(10, phase, "cosine") == pytest.approx(0.0, abs=1e-12)
