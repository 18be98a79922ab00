"""bench/weight_path.py: the weights on the line from the base through the trained model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import weight_path  # noqa: E402


def _weights(scale: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, -2.0]) * scale, "ids": torch.tensor([0, 1, 2]) + int(scale)}


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 1.5])
def test_floats_move_along_the_update_and_integer_buffers_stay_trained(alpha):
    base, trained = _weights(1.0), _weights(3.0)
    moved = weight_path.interpolate(base, trained, alpha)
    assert torch.allclose(moved["w"], torch.tensor([1.0, -2.0]) * (1.0 + 2.0 * alpha))
    assert torch.equal(moved["ids"], trained["ids"])


def test_models_with_different_tensors_are_refused():
    with pytest.raises(SystemExit, match="differ in their tensors"):
        weight_path.interpolate(_weights(1.0), {"w": torch.zeros(2)}, 0.5)
