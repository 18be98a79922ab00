"""Each choice name a curriculum offers (config/choices.py, config/layouts.py) is implemented by its
owner, and nothing implements a name the curriculum does not offer."""

from __future__ import annotations

import pytest
import torch

from tripletctl.config import choices
from tripletctl.config.layouts import LAYOUT_OF, LAYOUTS
from tripletctl.config.lr_scaling import EXPONENT
from tripletctl.model.distances import pairwise_distances
from tripletctl.model.encoder import pool
from tripletctl.train import losses, mining
from tripletctl.train.lr import get_lr


def test_every_mining_mode_has_exactly_one_function():
    assert tuple(mining.MODE_FUNCTIONS) == choices.MINING_MODES
    assert set(mining.PAIR_NEGATIVES) < set(choices.MINING_MODES)
    assert choices.COLLAPSE_FALLBACK_MODE in choices.MINING_MODES


def test_every_loss_has_exactly_one_function():
    assert tuple(losses.LOSS_FUNCTIONS) == choices.LOSSES
    assert set(losses.TRIPLET_LOSSES) < set(choices.LOSSES)
    assert choices.INFONCE_MINING in choices.MINING_MODES
    assert set(choices.GUARDED_MODES) < set(choices.MINING_MODES)


def test_every_lr_scaling_has_an_exponent():
    assert tuple(EXPONENT) == choices.LR_SCALINGS


@pytest.mark.parametrize("distance", choices.DISTANCES)
def test_every_distance_is_computed(distance):
    assert pairwise_distances(torch.eye(3), distance).shape == (3, 3)


def test_an_unknown_distance_is_refused():
    with pytest.raises(ValueError, match="unknown distance"):
        pairwise_distances(torch.eye(3), "manhattan")


@pytest.mark.parametrize("fallback", choices.FALLBACKS)
def test_every_fallback_is_accepted_by_mining(fallback):
    loss, _ = mining.mine(torch.eye(4), torch.tensor([0, 0, 1, 1]), "semi-hard", 0.2, fallback=fallback)
    assert torch.isfinite(loss)


def test_pooling_choices_differ():
    hidden = torch.arange(12.0).reshape(1, 3, 4)
    mask = torch.ones(1, 3)
    results = {p: pool(hidden, mask, p) for p in choices.POOLINGS}
    assert len({tuple(r.flatten().tolist()) for r in results.values()}) == len(choices.POOLINGS)


@pytest.mark.parametrize("decay", choices.DECAYS)
def test_every_decay_gives_a_learning_rate(decay):
    from types import SimpleNamespace

    phase = SimpleNamespace(lr=1e-3, warmup_steps=0, steps=10)
    assert 0 <= get_lr(5, phase, decay) <= 1e-3


def test_layouts_are_declared_once_with_their_columns():
    assert LAYOUTS == tuple(LAYOUT_OF) == ("labelled", "pairs", "triplets")
    assert [layout.grouped for layout in LAYOUT_OF.values()] == [False, True, True]
    assert [layout.given_negatives for layout in LAYOUT_OF.values()] == [False, False, True]
