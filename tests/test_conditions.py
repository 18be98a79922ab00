"""Phase end conditions on scripted metric sequences: each condition ends a phase at the step worked
out by hand (or by pandas' EMA for the smoothing), nothing ends before min_steps, and the state
survives a JSON round trip at any step with the same decisions afterwards (exact resume). End to end,
`until:` ends real phases at the steps their metrics say, also across a `--resume`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers import final_weights, write_curriculum
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config.until import Plateau, UntilConfig, describe
from tripletctl.config.validate import load_curriculum
from tripletctl.train.conditions import ConditionState, advance, readings
from tripletctl.train.run import train


def run(
    until: UntilConfig,
    steps: list[dict],
    evals: dict[int, dict] | None = None,
    state: ConditionState | None = None,
    first_step: int = 1,
) -> tuple[int | None, list, ConditionState]:
    """Feed steps first_step.. in order; return (the step the phase ends at or None, held readings, state)."""
    state = state or ConditionState()
    for offset, metrics in enumerate(steps):
        step = first_step + offset
        state, held = advance(until, state, step=step, metrics=metrics, eval_metrics=(evals or {}).get(step))
        if held:
            return step, held, state
    return None, [], state


def series(name: str, values: list[float]) -> list[dict]:
    return [{name: v} for v in values]


def test_smoothing_is_pandas_ewm_with_span_window():
    values = [0.9, 0.2, 0.7, 0.4, 0.4, 0.1, 0.8, 0.3, 0.05, 0.6]
    state = ConditionState()
    until = UntilConfig(min_steps=1, window=4, loss_below=1e-9)
    ours = []
    for step, v in enumerate(values, 1):
        state, _ = advance(until, state, step=step, metrics={"loss": v})
        ours.append(state.smoothed["loss"])
    reference = pd.Series(values).ewm(span=4, adjust=False).mean().tolist()
    assert ours == pytest.approx(reference, rel=1e-12)


@pytest.mark.parametrize(
    ("condition", "metric"),
    [
        ("active_fraction_below", "active_fraction"),
        ("loss_below", "loss"),
        ("batch_hard_loss_below", "batch_hard_loss"),
    ],
)
def test_threshold_ends_at_first_step_the_average_is_below(condition, metric):
    values = [0.5 - 0.01 * i + (0.03 if i % 3 == 0 else 0.0) for i in range(60)]  # noisy decline
    until = UntilConfig(min_steps=5, window=6, **{condition: 0.3})
    ema = pd.Series(values).ewm(span=6, adjust=False).mean()
    expected = next(i + 1 for i, v in enumerate(ema) if v < 0.3 and i + 1 >= 5)
    raw_first = next(i + 1 for i, v in enumerate(values) if v < 0.3)
    assert raw_first < expected  # the smoothing matters: a single low step does not end the phase
    step, held, _ = run(until, series(metric, values))
    assert step == expected
    assert [r.condition for r in held] == [condition] and held[0].metric == metric
    assert held[0].value == pytest.approx(ema[expected - 1]) and held[0].value < 0.3
    assert held[0].threshold == 0.3


def test_other_signals_do_not_trigger_a_threshold():
    until = UntilConfig(min_steps=1, window=1, loss_below=0.1)
    assert run(until, [{"loss": 0.5, "active_fraction": 0.0, "batch_hard_loss": 0.0}] * 20)[0] is None


def test_nothing_ends_before_min_steps():
    until = UntilConfig(min_steps=7, window=1, loss_below=0.5)
    assert run(until, series("loss", [0.1] * 20))[0] == 7


def test_plateau_ends_after_patience_steps_without_relative_improvement():
    # falls 10% a step for 10 steps, then flat: the last improvement is at step 10
    values = [1.0 * 0.9**i for i in range(10)] + [0.9**9] * 30
    until = UntilConfig(min_steps=1, window=1, plateau=Plateau("batch_hard_loss", patience=5, min_delta=0.01))
    step, held, state = run(until, series("batch_hard_loss", values))
    assert step == 15
    assert held[0].condition == "plateau" and held[0].count == 5 and held[0].threshold == 5
    assert state.best == pytest.approx(0.9**9)


def test_plateau_improvements_smaller_than_min_delta_do_not_count():
    # falls 0.4% a step: below a 1% min_delta, so the best only moves every third step (by ~1.2%)
    values = [0.996**i for i in range(40)]
    strict = UntilConfig(min_steps=1, window=1, plateau=Plateau("loss", patience=3, min_delta=0.01))
    # best at step 1 (1.0); 0.996, 0.992 are within 1%; step 4 (0.988) improves: 2 steps without -> never 3
    assert run(strict, series("loss", values))[0] is None
    looser = UntilConfig(min_steps=1, window=1, plateau=Plateau("loss", patience=3, min_delta=0.02))
    # with 2%: nothing until step 7 (0.976) improves on 1.0 by 2%: steps 2-4 make 3 without -> ends at step 4
    assert run(looser, series("loss", values))[0] == 4


def test_plateau_on_active_fraction_counts_during_min_steps_but_ends_after():
    values = [0.5] * 30
    until = UntilConfig(min_steps=12, window=3, plateau=Plateau("active_fraction", patience=4))
    assert run(until, series("active_fraction", values))[0] == 12


def test_eval_plateau_counts_held_out_evals_not_steps():
    until = UntilConfig(min_steps=1, window=5, eval_plateau=Plateau("recall@1", patience=2))
    evals = {
        5: {"recall@1": 0.50},
        10: {"recall@1": 0.62},
        15: {"recall@1": 0.61},
        20: {"recall@1": 0.62},
        25: {"recall@1": 0.70},
    }
    step, held, _ = run(until, series("loss", [0.2] * 40), evals)
    assert step == 20  # 0.61 and 0.62 (not above the best 0.62): two evals without improvement
    assert held[0].condition == "eval_plateau" and held[0].value == 0.62 and held[0].count == 2


def test_eval_plateau_min_delta_is_relative_and_reads_the_named_metric():
    until = UntilConfig(min_steps=1, eval_plateau=Plateau("map@r", patience=1, min_delta=0.05))
    evals = {2: {"map@r": 0.40, "recall@1": 0.1}, 4: {"map@r": 0.41, "recall@1": 0.9}, 6: {"map@r": 0.50}}
    assert run(until, series("loss", [0.2] * 10), evals)[0] == 4  # 0.41 < 0.40 * 1.05


def test_any_ends_on_one_condition_all_needs_every_one_at_once():
    steps = [{"loss": 0.05, "active_fraction": 0.5 - 0.05 * i} for i in range(10)]
    both = {"loss_below": 0.1, "active_fraction_below": 0.28}
    any_step, held, _ = run(UntilConfig(min_steps=1, window=1, **both), steps)
    assert any_step == 1 and [r.condition for r in held] == ["loss_below"]
    all_step, held, _ = run(UntilConfig(min_steps=1, window=1, combine="all", **both), steps)
    assert all_step == 6  # active fraction 0.25 < 0.28 at step 6
    assert sorted(r.condition for r in held) == ["active_fraction_below", "loss_below"]


def test_non_finite_values_leave_the_state_unchanged():
    until = UntilConfig(min_steps=1, window=3, loss_below=0.1, plateau=Plateau("loss", patience=2))
    state, _ = advance(until, ConditionState(), step=1, metrics={"loss": 0.5})
    for bad in (math.nan, math.inf):
        after, held = advance(until, state, step=2, metrics={"loss": bad})
        assert after == state and held is None


@pytest.mark.parametrize("split", range(1, 40, 3))
def test_state_round_trips_through_json_with_the_same_decisions(split):
    """What a checkpoint does mid-phase: dump the state as JSON, load it, carry on."""
    until = UntilConfig(
        min_steps=3,
        window=7,
        combine="all",
        batch_hard_loss_below=0.33,
        plateau=Plateau("loss", patience=6, min_delta=0.001),
        eval_plateau=Plateau("recall@1", patience=1),
    )
    steps = [
        {"loss": 0.3 + 0.1 * math.sin(i / 3) * 0.97**i, "batch_hard_loss": 0.5 - 0.005 * i, "active_fraction": 0.4}
        for i in range(80)
    ]
    evals = {i: {"recall@1": 0.5 + 0.01 * min(i, 30)} for i in range(5, 80, 5)}
    straight = run(until, steps, evals)
    assert straight[0] is not None
    if split >= straight[0]:
        return
    _, _, middle = run(until, steps[:split], evals)
    restored = ConditionState.from_dict(json.loads(json.dumps(middle.to_dict())))
    assert restored == middle
    resumed = run(until, steps[split:], evals, state=restored, first_step=split + 1)
    assert resumed[0] == straight[0] and resumed[1] == straight[1]


def test_readings_and_descriptions_for_the_display():
    until = UntilConfig(
        min_steps=8,
        window=20,
        active_fraction_below=0.05,
        plateau=Plateau("batch_hard_loss", patience=50, min_delta=0.01),
    )
    state, _ = advance(until, ConditionState(), step=1, metrics={"active_fraction": 0.25, "batch_hard_loss": 0.3})
    shorts = [r.short() for r in readings(until, state)]
    assert shorts == ["active_fraction 0.25/<0.05", "batch_hard_loss plateau 0/50"]
    assert describe(until) == (
        "when active_fraction < 0.05 or batch_hard_loss plateau (50 steps, min_delta 1%) "
        "(checked from step 8, EMA over 20 steps)"
    )
    assert readings(until, state)[0].describe(20) == "active_fraction 0.25 >= 0.05 (EMA over 20 steps)"


def _until_curriculum(tmp_path: Path, *, with_eval: bool = False) -> Path:
    """Run A (no eval): each phase ends on a different condition of the step signals.
    Run B (eval every 2 steps): the first phase ends on a held-out plateau, the second on a loss threshold."""
    path = write_curriculum(tmp_path, steps=(10, 10, 10), checkpoint_every=0, with_eval=with_eval)
    spec = yaml.safe_load(path.read_text())
    phases = spec["phases"]
    if not with_eval:
        phases[0]["mining"] = "batch-all"  # its active fraction falls within a few steps
        phases[0]["until"] = {"active_fraction_below": 0.97, "window": 2, "min_steps": 2}
        phases[1]["until"] = {"batch_hard_loss_below": 0.37, "window": 2, "min_steps": 2}
        phases[2]["until"] = {"plateau": {"metric": "loss", "patience": 2, "min_delta": 0.03}, "min_steps": 2}
    else:
        spec["eval"].update(every=2, max_rows=120)
        phases[0]["until"] = {"eval_plateau": {"metric": "recall@1", "patience": 1, "min_delta": 0.9}}
        phases[1]["until"] = {"loss_below": 1.0, "min_steps": 2}
        phases[2]["steps"] = 1
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _phase_logs(run: Path) -> list[tuple[list[dict], list[dict]]]:
    """(step records, event records) of each phase directory, in order."""
    out = []
    for phase_dir in sorted(run.glob("phase-*")):
        records = [json.loads(line) for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]
        out.append(([r for r in records if "event" not in r], [r for r in records if "event" in r]))
    return out


def _first_step(holds, min_steps: int, steps: int) -> int:
    """The step a phase must end at: the first step >= min_steps at which `holds(t)`, else its last step."""
    return next((t for t in range(min_steps, steps + 1) if holds(t)), steps)


@pytest.fixture(scope="module")
def until_run(tmp_path_factory) -> Path:
    path = _until_curriculum(tmp_path_factory.mktemp("until"))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    return path.parent / "run"


@pytest.mark.slow
def test_until_conditions_end_phases_end_to_end(until_run):
    """Each phase ends exactly where the logged numbers, smoothed independently (pandas), say."""
    import pandas as pd

    logs = _phase_logs(until_run)
    ema = lambda records, key, window: pd.Series([r[key] for r in records]).ewm(span=window, adjust=False).mean()  # noqa: E731
    steps0, steps1, steps2 = (steps for steps, _ in logs)
    # logged records run up to the step the phase ended at; the reference uses the same numbers
    af = ema(steps0, "active_fraction", 2)
    expected0 = _first_step(lambda t: af[t - 1] < 0.97, 2, 10)
    bhl = ema(steps1, "batch_hard_loss", 2)
    expected1 = _first_step(lambda t: bhl[t - 1] < 0.37, 2, 10)
    loss = ema(steps2, "loss", 20)
    best, since, plateau_from = None, 0, None
    for t, value in enumerate(loss, 1):
        best, since = (value, 0) if best is None or value < best * (1 - 0.03) else (best, since + 1)
        if t >= 2 and since >= 2 and plateau_from is None:
            plateau_from = t
    expected2 = plateau_from or 10
    assert [len(steps0), len(steps1), len(steps2)] == [expected0, expected1, expected2]
    assert max(expected0, expected1, expected2) < 10, "every phase should end early on these numbers"

    index = json.loads((until_run / "run.json").read_text())
    for phase, (_steps, events), expected, condition, metric in zip(
        index["phases"],
        logs,
        (expected0, expected1, expected2),
        ("active_fraction_below", "batch_hard_loss_below", "plateau"),
        ("active_fraction", "batch_hard_loss", "loss"),
    ):
        assert phase["status"] == "done" and phase["ended_by"] == "until"
        assert (phase["steps_planned"], phase["steps_done"]) == (10, expected)
        (event,) = [e for e in events if e["event"] == "until"]
        assert (event["condition"], event["metric"], event["step"]) == (condition, metric, expected)
        summary = json.loads((until_run / phase["dir"] / "summary.json").read_text())
        assert (summary["steps_planned"], summary["steps_done"], summary["ended_by"]) == (10, expected, "until")
        assert summary["end_reason"] == event["reason"] and metric in event["reason"]
        state = json.loads((until_run / phase["dir"] / "checkpoint" / "state.json").read_text())
        assert state["step"] == expected  # the phase-end checkpoint, as at a planned end
    assert logs[0][1][0]["value"] == pytest.approx(af[expected0 - 1])
    assert logs[1][1][0]["value"] == pytest.approx(bhl[expected1 - 1])
    # the next phase started right after: global steps run on without a gap
    assert logs[1][0][0]["global_step"] == expected0 + 1 and logs[2][0][0]["global_step"] == expected0 + expected1 + 1


@pytest.mark.slow
@pytest.mark.parametrize("where", ["inside phase 0", "inside phase 2"])
def test_resume_with_until_ends_phases_at_the_same_steps(until_run, tmp_path, where):
    """Killed (paused) while the smoothing and plateau counters are mid-way, resumed: the phases end
    at the same steps, with the same weights, as the uninterrupted run."""
    index = json.loads((until_run / "run.json").read_text())
    done = [p["steps_done"] for p in index["phases"]]
    stop_after = done[0] - 1 if where == "inside phase 0" else done[0] + done[1] + 1
    path = _until_curriculum(tmp_path)
    assert train(load_curriculum(path), max_steps=stop_after) == 0
    assert train(load_curriculum(path), resume=True) == 0
    resumed = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [p["steps_done"] for p in resumed["phases"]] == done
    assert [p["end_reason"] for p in resumed["phases"]] == [p["end_reason"] for p in index["phases"]]
    a, b = final_weights(until_run), final_weights(tmp_path / "run")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_eval_plateau_and_loss_below_end_phases_end_to_end(tmp_path):
    """eval_plateau ends a phase on held-out evals; the early end runs the phase-end eval too."""
    path = _until_curriculum(tmp_path, with_eval=True)
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    (steps0, events0), (steps1, events1), _ = _phase_logs(run)
    evals0 = [e for e in events0 if e["event"] == "eval"]
    recalls = [e["recall@1"] for e in evals0]
    # with min_delta 0.9 an eval must raise recall@1 by 90% to count: the first eval that does not ends it
    expected = next(2 * (i + 1) for i in range(1, len(recalls)) if recalls[i] <= max(recalls[:i]) * 1.9)
    assert len(steps0) == expected < 10
    (until0,) = [e for e in events0 if e["event"] == "until"]
    assert until0["condition"] == "eval_plateau" and until0["value"] == max(recalls[:-1])
    assert [e["step"] for e in evals0] == list(range(2, expected + 1, 2))
    # loss_below 1.0 holds at once: phase 1 ends at min_steps (2), with its phase-end eval at step 2
    assert len(steps1) == 2
    assert [e["event"] for e in events1] == ["until", "eval"] and events1[1]["step"] == 2
    index = json.loads((run / "run.json").read_text())
    assert [p["ended_by"] for p in index["phases"]] == ["until", "until", "steps"]
    assert index["eval_final"]["global_step"] == expected + 2 + 1
