"""Phase end conditions (`until:`): end a phase when what the training shows says it is finished.

Pure Python, no torch: the runner feeds `advance` the numbers every rank already agrees on (the
step's mined loss, batch-hard loss and active fraction after the per-step all-reduce, and held-out
metrics broadcast from rank 0), so every rank takes the same decision at the same step. The state
is a small dataclass that round-trips through a plain dict (JSON in the checkpoint), so a resumed
run ends its phases exactly where an uninterrupted one does.

Smoothing: every step signal is an exponential moving average with span `window`
(alpha = 2 / (window + 1), started at the first value: pandas' `ewm(span=window, adjust=False)`).
A threshold holds when the smoothed value is below it; a plateau holds when the smoothed value has
not improved (fallen) by at least `min_delta` relative to its best for `patience` steps; an eval
plateau when `patience` held-out evals in a row have not raised the metric by `min_delta` relative.
Nothing is checked before `min_steps` steps of the phase."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from tripletctl.config.blocks import PhaseConfig
from tripletctl.config.until import STEP_METRICS, THRESHOLDS, UntilConfig, plural


@dataclass
class ConditionState:
    """Everything `advance` remembers between steps; `to_dict`/`from_dict` for the checkpoint."""

    smoothed: dict[str, float] = field(default_factory=dict)  # moving average of each step metric
    best: float | None = None  # plateau: best smoothed value so far
    since_best: int = 0  # plateau: steps since it last improved by min_delta
    eval_best: float | None = None
    evals_since_best: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping | None) -> ConditionState:
        data = data or {}
        return cls(
            smoothed={str(k): float(v) for k, v in (data.get("smoothed") or {}).items()},
            best=None if data.get("best") is None else float(data["best"]),
            since_best=int(data.get("since_best", 0)),
            eval_best=None if data.get("eval_best") is None else float(data["eval_best"]),
            evals_since_best=int(data.get("evals_since_best", 0)),
        )


@dataclass(frozen=True)
class Reading:
    """One condition now: the value it reads against its threshold, and whether it holds."""

    condition: str  # a CONDITIONS key
    metric: str
    value: float | None  # smoothed value (thresholds, plateau) or last eval (eval_plateau)
    threshold: float | int  # the threshold, or the patience
    count: int | None  # plateau / eval_plateau: steps / evals without improvement
    held: bool

    def describe(self, window: int) -> str:
        if self.condition in THRESHOLDS:
            relation = "<" if self.held else ">="
            return f"{self.metric} {fmt_value(self.value)} {relation} {self.threshold:g} (EMA over {window} steps)"
        unit = plural(self.count or 0, "step" if self.condition == "plateau" else "eval")
        return (
            f"{self.metric} plateau: {unit} without improvement (patience {self.threshold}, "
            f"{'EMA' if self.condition == 'plateau' else 'best'} {fmt_value(self.value)})"
        )

    def short(self) -> str:
        """For the progress bar: the smoothed value against its threshold."""
        if self.condition in THRESHOLDS:
            return f"{self.metric} {fmt_value(self.value)}/<{self.threshold:g}"
        label = "plateau" if self.condition == "plateau" else "eval plateau"
        return f"{self.metric} {label} {self.count}/{self.threshold}"


def fmt_value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _improved(value: float, best: float | None, min_delta: float, higher_is_better: bool) -> bool:
    if best is None:
        return True
    if higher_is_better:
        return value > best + min_delta * abs(best)
    return value < best - min_delta * abs(best)


def advance(
    until: UntilConfig,
    state: ConditionState,
    *,
    step: int,
    metrics: Mapping[str, float],
    eval_metrics: Mapping[str, float] | None = None,
) -> tuple[ConditionState, list[Reading] | None]:
    """Fold step `step` (1-based in the phase) into the state; return the new state and, when the
    phase should end now, the readings that ended it (those that hold). Non-finite values (a diverged
    step) leave the state unchanged: they must neither end a phase nor poison the average."""
    alpha = 2.0 / (until.window + 1)
    smoothed = dict(state.smoothed)
    fed = set()
    for name in STEP_METRICS:
        value = metrics.get(name)
        if value is None or not math.isfinite(value):
            continue
        previous = smoothed.get(name)
        smoothed[name] = float(value) if previous is None else previous + alpha * (float(value) - previous)
        fed.add(name)
    new = ConditionState(smoothed, state.best, state.since_best, state.eval_best, state.evals_since_best)
    if until.plateau is not None and until.plateau.metric in fed:
        value = smoothed[until.plateau.metric]
        if _improved(value, new.best, until.plateau.min_delta, higher_is_better=False):
            new.best, new.since_best = value, 0
        else:
            new.since_best += 1
    if until.eval_plateau is not None and eval_metrics is not None:
        value = eval_metrics.get(until.eval_plateau.metric)
        if value is not None and math.isfinite(value):
            if _improved(float(value), new.eval_best, until.eval_plateau.min_delta, higher_is_better=True):
                new.eval_best, new.evals_since_best = float(value), 0
            else:
                new.evals_since_best += 1
    if step < until.min_steps:
        return new, None
    now = readings(until, new)
    held = [r for r in now if r.held]
    ends = bool(held) and (until.combine == "any" or len(held) == len(now))
    return new, held if ends else None


def readings(until: UntilConfig, state: ConditionState) -> list[Reading]:
    """Every condition of `until` against the current state (for the decision and the display)."""
    out = []
    for name, metric in THRESHOLDS.items():
        threshold = getattr(until, name)
        if threshold is not None:
            value = state.smoothed.get(metric)
            out.append(Reading(name, metric, value, threshold, None, value is not None and value < threshold))
    if until.plateau is not None:
        p = until.plateau
        out.append(
            Reading(
                "plateau",
                p.metric,
                state.smoothed.get(p.metric),
                p.patience,
                state.since_best,
                state.best is not None and state.since_best >= p.patience,
            )
        )
    if until.eval_plateau is not None:
        p = until.eval_plateau
        out.append(
            Reading(
                "eval_plateau",
                p.metric,
                state.eval_best,
                p.patience,
                state.evals_since_best,
                state.eval_best is not None and state.evals_since_best >= p.patience,
            )
        )
    return out


def until_display(until: UntilConfig | None, state: ConditionState) -> str | None:
    """The conditions as the progress display shows them, e.g. `active_fraction 0.31 < 0.05`."""
    return None if until is None else "  ".join(r.short() for r in readings(until, state))


def until_event(until: UntilConfig, held: list[Reading], *, phase: PhaseConfig, step: int, global_step: int) -> dict:
    """The metrics.jsonl line saying which condition ended the phase, on which smoothed value."""
    first = held[0]
    return {
        "event": "until",
        "global_step": global_step,
        "phase": phase.name,
        "step": step,
        "steps_planned": phase.steps,
        "condition": first.condition,
        "metric": first.metric,
        "value": first.value,
        "threshold": first.threshold,
        "combine": until.combine,
        "window": until.window,
        "held": [
            {"condition": r.condition, "metric": r.metric, "value": r.value, "threshold": r.threshold, "count": r.count}
            for r in held
        ],
        "reason": "; ".join(r.describe(until.window) for r in held),
    }
