"""The phase loop (tripletctl/train/loop.py) end to end: exact resume (row chunks and token budgets),
what the collapse watchdog's `on_collapse` does, and non-finite steps skipped or stopping the run."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import final_weights, one_phase, write_curriculum
from safetensors.torch import load_file

from tripletctl.config.validate import load_curriculum
from tripletctl.core.exit_codes import EXIT_NONFINITE
from tripletctl.train.run import train

pytestmark = pytest.mark.slow  # end to end: the real CLI, subprocesses, several processes or faults


@pytest.mark.parametrize(("interrupt_after", "workers"), [(1, 0), (4, 0), (6, 0), (5, 1)])
def test_resume_matches_uninterrupted_run(tmp_path, interrupt_after, workers):
    """Stop after k steps (mid-phase, at a phase boundary, in a later phase), resume, and end
    with the same weights as a run that was never interrupted. Dropout is on; tokenisation runs
    in the main process or in a worker process that works ahead of the trainer."""
    straight = write_curriculum(tmp_path / "straight", checkpoint_every=3, tokenizer_workers=workers)
    assert train(load_curriculum(straight)) == 0

    broken = write_curriculum(tmp_path / "broken", checkpoint_every=3, tokenizer_workers=workers)
    assert train(load_curriculum(broken), max_steps=interrupt_after) == 0
    index = json.loads((tmp_path / "broken" / "run" / "run.json").read_text())
    assert any(p["status"] in ("paused", "pending") for p in index["phases"])
    assert train(load_curriculum(broken), resume=True) == 0

    a, b = final_weights(tmp_path / "straight" / "run"), final_weights(tmp_path / "broken" / "run")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    # no step logged twice after the resume
    for phase_dir in sorted((tmp_path / "broken" / "run").glob("phase-*")):
        steps = [
            json.loads(line)["global_step"]
            for line in (phase_dir / "metrics.jsonl").read_text().splitlines()
            if "event" not in json.loads(line)
        ]
        assert steps == sorted(set(steps))


def test_resume_with_token_budget_chunks_matches_uninterrupted_run(tmp_path):
    """Length-sorted token-budget chunks smaller than the batches (gradient caching over packed
    chunks): an interrupted run still ends with the same weights."""
    chunks = {"chunk_size": "auto", "chunk_tokens": 200}
    straight = write_curriculum(tmp_path / "straight", checkpoint_every=3, **chunks)
    assert train(load_curriculum(straight)) == 0
    broken = write_curriculum(tmp_path / "broken", checkpoint_every=3, **chunks)
    assert train(load_curriculum(broken), max_steps=5) == 0
    assert train(load_curriculum(broken), resume=True) == 0
    a, b = final_weights(tmp_path / "straight" / "run"), final_weights(tmp_path / "broken" / "run")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    records = [
        json.loads(line)
        for phase_dir in sorted((tmp_path / "straight" / "run").glob("phase-*"))
        for line in (phase_dir / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in records if "event" not in r]
    assert {r["chunk_tokens"] for r in steps} == {200} and {r["chunk_size"] for r in steps} == {None}
    assert {r["graph_kept"] for r in steps} == {False} and all(r["chunks"] > 1 for r in steps)
    assert all(r["real_tokens"] <= r["padded_tokens"] <= 1.3 * r["real_tokens"] for r in steps)


def _collapsed_build(real_build):
    """The real model with its head's last layer zeroed and a constant bias: every input maps to
    one point, the loss sits at the margin and the gradients vanish (a collapse that stays)."""

    def build(model_cfg, seed):
        model, tokenizer = real_build(model_cfg, seed)
        last = model.head[-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.constant_(last.bias, 0.5)
        return model, tokenizer

    return build


@pytest.mark.parametrize("action", ["warn", "stop", "fallback"])
def test_collapse_watchdog_acts_as_on_collapse_says(tmp_path, monkeypatch, action):
    import tripletctl.train.setup as setup_module

    monkeypatch.setattr(setup_module, "build_model", _collapsed_build(setup_module.build_model))
    path = write_curriculum(
        tmp_path, steps=(1, 4, 1), checkpoint_every=0, with_eval=True, on_collapse=action, collapse_patience=2
    )
    if action == "warn":  # also: eval every N steps inside a phase
        spec = yaml.safe_load(path.read_text())
        spec["eval"]["every"] = 2
        path.write_text(yaml.safe_dump(spec))
    code = train(load_curriculum(path))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "phase-1-hard-negative" / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if r.get("event") == "collapse"]
    steps = [r for r in records if "event" not in r]
    assert events and events[0]["action"] == action and events[0]["embedding_spread"] < 0.05
    assert abs(events[0]["batch_hard_loss"] - 0.2) < 0.002
    status = [p["status"] for p in json.loads((run / "run.json").read_text())["phases"]]
    if action == "stop":
        assert code == 3 and status == ["done", "stopped (collapse)", "pending"]  # EXIT_COLLAPSE_STOP
        state = json.loads((run / "phase-1-hard-negative" / "checkpoint" / "state.json").read_text())
        assert state["step"] == events[0]["global_step"] - 1 == 2
    elif action == "fallback":
        assert code == 0 and status == ["done", "done", "done"]
        assert [r["mining"] for r in steps] == ["hard-negative", "hard-negative", "semi-hard", "semi-hard"]
    else:
        assert code == 0 and status == ["done", "done", "done"]
        assert {r["mining"] for r in steps} == {"hard-negative"}
        evals = [r for r in records if r.get("event") == "eval"]
        assert [e["step"] for e in evals] == [2, 4] and all("recall@1" in e for e in evals)


def _poisoned(real, bad_calls: set[int]):
    """embed_and_backward whose loss and one gradient are NaN on the given (1-based) calls."""
    calls = {"n": 0}

    def run(model, *args, **kwargs):
        calls["n"] += 1
        loss, stats, rest = real(model, *args, **kwargs)
        if calls["n"] in bad_calls:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
            loss = torch.tensor(float("nan"))
        return loss, stats, rest

    return run


def test_on_nonfinite_skip_drops_the_step_and_the_run_finishes(tmp_path, monkeypatch):
    import tripletctl.train.loop as loop_module

    monkeypatch.setattr(loop_module, "embed_and_backward", _poisoned(loop_module.embed_and_backward, {2, 3}))
    path = one_phase(write_curriculum(tmp_path, steps=(4, 1, 1), checkpoint_every=0, on_nonfinite="skip"))
    assert train(load_curriculum(path)) == 0
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "phase-0-semi-hard" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    skipped = [r for r in records if r.get("event") == "nonfinite"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # 4 optimiser steps, taken on 6 batches
    assert [(r["step"], r["action"], r["in_a_row"], r["loss"]) for r in skipped] == [
        (2, "skip", 1, None),
        (2, "skip", 2, None),
    ]
    state = json.loads((run / "phase-0-semi-hard" / "checkpoint" / "state.json").read_text())
    assert (state["global_step"], state["nonfinite_skipped"], state["nonfinite_streak"]) == (4, 2, 0)
    summary = json.loads((run / "phase-0-semi-hard" / "summary.json").read_text())
    assert summary["steps_done"] == 4 and summary["nonfinite_steps"] == 2
    weights = load_file(str(run / "phase-0-semi-hard" / "checkpoint" / "model" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_on_nonfinite_stop_keeps_the_checkpoint_and_exits_4(tmp_path, monkeypatch):
    import tripletctl.train.loop as loop_module

    monkeypatch.setattr(loop_module, "embed_and_backward", _poisoned(loop_module.embed_and_backward, {3}))
    path = one_phase(write_curriculum(tmp_path, steps=(4, 1, 1), checkpoint_every=1))
    checkpoint = tmp_path / "run" / "phase-0-semi-hard" / "checkpoint"
    assert train(load_curriculum(path)) == EXIT_NONFINITE == 4
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 2
    index = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [p["status"] for p in index["phases"]] == ["stopped (non-finite)"]
    summary = (tmp_path / "run" / "phase-0-semi-hard" / "summary.json").read_text()
    assert json.loads(summary)["nonfinite_steps"] == 1 and "NaN" not in summary
