"""The `until:` block of a phase: end conditions as configuration (what is checked, on which metric).

Declared here, apart from the logic that evaluates them (train/conditions.py), so that loading a
curriculum needs neither torch nor the training layer. Docs: docs/curricula.md#until.
"""

from __future__ import annotations

from dataclasses import dataclass

from tripletctl.config.schema import choice, fraction, integer, key, mapping, number, optional, relative_delta

STEP_METRICS = ("loss", "batch_hard_loss", "active_fraction")  # smoothed; lower is better
THRESHOLDS = {  # condition key -> the step metric it reads
    "active_fraction_below": "active_fraction",
    "loss_below": "loss",
    "batch_hard_loss_below": "batch_hard_loss",
}
EVAL_METRICS = ("recall@1", "recall@5", "recall@10", "map@r", "r_precision", "triplet_accuracy")  # higher is better
COMBINE = ("any", "all")
CONDITIONS = (*THRESHOLDS, "plateau", "eval_plateau")


@dataclass(frozen=True)
class Plateau:
    """`until.plateau` / `until.eval_plateau`; the metric's check comes with the condition (`metrics`)."""

    metric: str = key(check=None, required=True, help="a STEP_METRICS (plateau) or EVAL_METRICS (eval_plateau) name")
    patience: int = key(check=integer(1), required=True, help="steps (plateau) or held-out evals (eval_plateau)")
    min_delta: float = key(0.0, check=relative_delta, help="smallest relative improvement that counts (0.01 = 1%)")


_PLATEAU = "a mapping {metric, patience, min_delta}, or null"


@dataclass(frozen=True)
class UntilConfig:
    """A phase's end conditions (`until:`); `steps` stays the phase's maximum."""

    min_steps: int = key(
        check=integer(1), help="no condition is checked before this step of the phase (default: 10% of steps)"
    )
    window: int = key(20, check=integer(1), help="span of the moving average, in steps")
    combine: str = key("any", check=choice(COMBINE), help='"any": end when one condition holds; "all": all at once')
    active_fraction_below: float | None = key(None, check=optional(fraction), help="smoothed active fraction below")
    loss_below: float | None = key(None, check=optional(number()), help="smoothed mined loss below")
    batch_hard_loss_below: float | None = key(None, check=optional(number()), help="smoothed batch-hard loss below")
    plateau: Plateau | None = key(
        None, check=mapping(_PLATEAU), metrics=STEP_METRICS, help="a smoothed step metric stops falling"
    )
    eval_plateau: Plateau | None = key(
        None, check=mapping(_PLATEAU), metrics=EVAL_METRICS, help="a held-out metric stops rising (needs eval.every)"
    )

    def conditions(self) -> list[str]:
        """The condition keys that are set, in CONDITIONS order."""
        return [name for name in CONDITIONS if getattr(self, name) is not None]


def default_min_steps(steps: int) -> int:
    """10% of the phase: the first steps of a phase (warm-up, a new batch size) say little."""
    return max(1, steps // 10)


def describe(until: UntilConfig) -> str:
    """For the plan table: `when active_fraction < 0.05 or batch_hard_loss plateau (50 steps, min_delta 1%)
    (checked from step 8, EMA over 20 steps)`."""
    parts = []
    for name, metric in THRESHOLDS.items():
        threshold = getattr(until, name)
        if threshold is not None:
            parts.append(f"{metric} < {threshold:g}")
    for name, unit in (("plateau", "step"), ("eval_plateau", "eval")):
        p = getattr(until, name)
        if p is not None:
            delta = f", min_delta {p.min_delta * 100:g}%" if p.min_delta else ""
            parts.append(f"{p.metric} plateau ({plural(p.patience, unit)}{delta})")
    joiner = " or " if until.combine == "any" else " and "
    smoothed = any(getattr(until, name) is not None for name in (*THRESHOLDS, "plateau"))
    ema = f", EMA over {until.window} steps" if smoothed else ""
    return f"when {joiner.join(parts)} (checked from step {until.min_steps}{ema})"


def plural(count: int, unit: str) -> str:
    return f"{count} {unit}{'' if count == 1 else 's'}"
