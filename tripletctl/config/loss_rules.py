"""Which losses, mining modes, false-negative guard and memory go together: one table, no torch.

`validate` (config/phase_checks.py `_check_loss`) turns each combination it refuses into one line naming
the phase and the keys; `mine` (train/mining.py `_check`) refuses the same ones when called directly.
Neither writes a rule of its own: a new loss is a row here, its function in train/losses.py, and its
row in docs/mining.md ("Losses"), which says why each refusal is one.
"""

from __future__ import annotations

from dataclasses import dataclass

from tripletctl.config.choices import COLLAPSE_FALLBACK_MODE, GUARDED_MODES, INFONCE_MINING, MINING_MODES

DEFAULT_LOSS = "margin"


@dataclass(frozen=True)
class LossRule:
    """What one loss goes with."""

    mines: bool  # True: it scores the triplets a mining mode chose; False: the whole batch, mining nothing
    modes: tuple[str, ...]  # the mining modes it runs with
    refused_because: str  # why the other modes are refused (a clause of the error); "" when none is
    instead: str  # what to use instead, where more than one mode is allowed
    guarded: tuple[str, ...]  # the modes under which `false_negative_guard` applies
    memory: bool = True  # a cross-batch memory's rows may join its candidates
    temperature: bool = False  # it reads the phase's `temperature` (the plan shows it)
    hardness: bool = False  # it reads the phase's `hardness_alpha` (weights its negatives)
    distance_scale: bool = True  # its values are distances, as the batch-hard yardstick's (plots share an axis)


_SOFT_MODES = tuple(m for m in MINING_MODES if m != "batch-all")

LOSS_RULES: dict[str, LossRule] = {
    DEFAULT_LOSS: LossRule(mines=True, modes=MINING_MODES, refused_because="", instead="", guarded=GUARDED_MODES),
    "soft-margin": LossRule(
        mines=True,
        modes=_SOFT_MODES,
        refused_because="softplus is never 0, so every triplet is active and there is no O(B²) sum",
        instead="use mining batch-hard, or loss margin or infonce",
        guarded=tuple(m for m in GUARDED_MODES if m in _SOFT_MODES),
    ),
    "infonce": LossRule(
        mines=False,
        modes=(INFONCE_MINING,),
        refused_because="it uses every positive and negative of the batch; only false_negative_guard and memory "
        "change its candidates",
        instead="",
        guarded=(INFONCE_MINING,),
        temperature=True,
        hardness=True,
        distance_scale=False,  # a log of the batch size, ~4-8: its own axis
    ),
}


def _batch_losses() -> str:
    return ", ".join(f"loss {name}" for name, rule in LOSS_RULES.items() if not rule.mines)


def refusals(
    loss: str,
    mode: str | None,
    guard: bool = False,
    memory: bool = False,
    on_collapse: str | None = None,
    hardness: bool = False,
) -> list[tuple[str, tuple[str, ...]]]:
    """Every combination the table refuses, each as (one line saying why, the keys it names, the
    most specific first). An unknown loss or mode is another check's problem: nothing is said here."""
    rule = LOSS_RULES.get(loss)
    if rule is None:
        return []
    found = []
    if mode in MINING_MODES and mode not in rule.modes:
        if len(rule.modes) == 1:
            message = f"mining must be {rule.modes[0]} with loss {loss} ({rule.refused_because}), got '{mode}'"
        else:
            message = f"loss {loss} has no {mode} form ({rule.refused_because}): {rule.instead}, got mining '{mode}'"
        found.append((message, ("mining", "loss")))
    if on_collapse == "fallback" and COLLAPSE_FALLBACK_MODE not in rule.modes:
        found.append(
            (
                f"on_collapse fallback switches to {COLLAPSE_FALLBACK_MODE} mining, which loss {loss} does not use: "
                "set on_collapse to warn or stop, got 'fallback'",
                ("on_collapse", "loss"),
            )
        )
    if guard and mode in rule.modes and mode not in rule.guarded:
        found.append(
            (
                f"false_negative_guard applies to the hard modes ({', '.join(GUARDED_MODES)}) and {_batch_losses()}, "
                f"not {mode} mining (its negatives are drawn uniformly): remove it or change mining",
                ("false_negative_guard", "mining"),
            )
        )
    if memory and not rule.memory:
        found.append((f"loss {loss} takes no cross-batch memory: remove memory", ("memory", "loss")))
    if hardness and not rule.hardness:
        weighted = ", ".join(f"loss {name}" for name, r in LOSS_RULES.items() if r.hardness)
        found.append(
            (
                f"hardness_alpha weights the negatives of {weighted}, not loss {loss}: remove it or change loss",
                ("hardness_alpha", "loss"),
            )
        )
    return found
