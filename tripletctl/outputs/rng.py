"""The random-number generators a training step draws from, captured and restored as plain Python and
tensors: a checkpoint's rng.pt (loadable with weights_only=True), and the held-out evals that must
not disturb the training draws."""

from __future__ import annotations

import random
import sys
from typing import Any

import torch


def capture_rng() -> dict:
    """Every RNG a training step may draw from, as plain Python / tensors (weights_only-loadable)."""
    rng: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if "numpy" in sys.modules:  # only if something in the process uses numpy
        name, keys, pos, has_gauss, cached = sys.modules["numpy"].random.get_state()
        rng["numpy"] = (name, keys.tolist(), int(pos), int(has_gauss), float(cached))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    """Inverse of `capture_rng`; states for RNGs absent in this process are ignored."""
    random.setstate(_to_tuple(rng["python"]))
    torch.set_rng_state(rng["torch"])
    if "numpy" in rng:
        import numpy as np

        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in rng and torch.cuda.is_available():
        states = rng["cuda"][: torch.cuda.device_count()]
        for device, state in enumerate(states):
            torch.cuda.set_rng_state(state, device)


def _to_tuple(value: Any) -> Any:
    """random.setstate wants nested tuples; a serializer may hand back lists."""
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
