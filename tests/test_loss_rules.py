"""The table of which losses, mining modes, guard and memory go together (tripletctl/config/loss_rules.py):
it covers every loss, agrees with the loss registry, and `mine` refuses exactly what `validate` does."""

from __future__ import annotations

import itertools

import pytest
import torch

from tripletctl.config import choices
from tripletctl.config.loss_rules import LOSS_RULES, refusals
from tripletctl.train import losses
from tripletctl.train.mining import mine


def test_every_loss_has_one_rule_that_agrees_with_its_registry():
    assert tuple(LOSS_RULES) == choices.LOSSES
    assert {name for name, rule in LOSS_RULES.items() if rule.mines} == set(losses.TRIPLET_LOSSES)
    assert {name for name, rule in LOSS_RULES.items() if not rule.mines} == set(losses.BATCH_LOSSES)
    for rule in LOSS_RULES.values():
        assert set(rule.guarded) <= set(rule.modes) <= set(choices.MINING_MODES)
        assert bool(rule.refused_because) == (set(rule.modes) != set(choices.MINING_MODES))


@pytest.mark.parametrize("loss", choices.LOSSES)
def test_mine_refuses_exactly_what_the_table_refuses(loss):
    e, labels = torch.nn.functional.normalize(torch.randn(8, 4), dim=1), torch.arange(8) // 2
    memory = {"memory_embeddings": e[:2], "memory_labels": labels[:2]}
    for mode, guard, with_memory in itertools.product(choices.MINING_MODES, (None, 0.9), (False, True)):
        refused = refusals(loss, mode, guard=guard is not None, memory=with_memory)
        try:
            mine(e, labels, mode, 0.2, loss=loss, guard=guard, **(memory if with_memory else {}))
        except ValueError as error:
            assert refused and str(error) == refused[0][0], (mode, guard, error)
        else:
            assert not refused, (mode, guard, refused)


def test_the_fallback_mode_must_be_one_the_loss_uses():
    for loss, rule in LOSS_RULES.items():
        refused = refusals(loss, rule.modes[0], on_collapse="fallback")
        assert bool(refused) == (choices.COLLAPSE_FALLBACK_MODE not in rule.modes)
    assert refusals("hinge", "batch-hard", guard=True) == []  # an unknown loss is another check's problem
    assert refusals("margin", "hardest", guard=True) == []  # so is an unknown mode
