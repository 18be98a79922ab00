"""The RNG states (rng.py): restoring a capture repeats the same draws."""

from __future__ import annotations

import random

import numpy as np
import torch

from tripletctl.outputs.rng import capture_rng, restore_rng


def test_capture_restore_rng_repeats_draws():
    state = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
