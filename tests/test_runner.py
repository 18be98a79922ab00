"""End-to-end tests of the phase runner on the tiny BERT and small local files: the real CLI,
all phases, outputs, exact resume, Ctrl-C/SIGTERM, refusing to overwrite a run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_BERT
from safetensors.torch import load_file
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config.blocks import PhaseConfig
from tripletctl.config.validate import load_curriculum
from tripletctl.core.exit_codes import EXIT_NONFINITE
from tripletctl.train.lr import get_lr
from tripletctl.train.run import train

QUICKSTART_DATA = REPO / "curricula" / "quickstart" / "train.jsonl"
QUICKSTART_HELDOUT = REPO / "curricula" / "quickstart" / "heldout.jsonl"


def write_curriculum(
    tmp_path: Path,
    source: Path = QUICKSTART_DATA,
    steps: tuple[int, ...] = (4, 3, 3),
    checkpoint_every: int = 2,
    with_eval: bool = False,
    tokenizer_workers: int = 0,
    **train_extra,
) -> Path:
    """A three-phase curriculum (semi-hard -> hard-negative -> batch-hard, growing batches)."""
    modes = ("semi-hard", "hard-negative", "batch-hard")
    spec = {
        "model": {"name": str(TINY_BERT), "init": "config", "pooling": "mean", "head": [32]},
        "data": {
            "source": str(source),
            "shuffle_buffer": 256,
            "max_length": 24,
            "samples_per_class": 4,
            "tokenizer_workers": tokenizer_workers,
        },
        "train": {
            "lr": 1e-3,
            "warmup_steps": 2,
            "seed": 7,
            "output_dir": str(tmp_path / "run"),
            "checkpoint_every": checkpoint_every,
            "device": "cpu",
            "chunk_size": 16,
            **train_extra,
        },
        "phases": [
            {"name": mode, "mining": mode, "batch_size": 16 * (2**i), "margin": 0.2, "steps": n}
            for i, (mode, n) in enumerate(zip(modes, steps))
        ],
    }
    if with_eval:
        spec["eval"] = {"source": str(QUICKSTART_HELDOUT), "max_rows": 200}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "curriculum.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model_dir = run_dir / "phase-2-batch-hard" / "checkpoint" / "model"
    weights = load_file(str(model_dir / "model.safetensors"))
    for dense in sorted(model_dir.glob("*_Dense")):  # the head lives in its sentence-transformers Dense modules
        weights.update({f"{dense.name}.{k}": v for k, v in load_file(str(dense / "model.safetensors")).items()})
    assert any(k.endswith("_Dense.linear.weight") for k in weights)
    return weights


def test_get_lr_warms_up_then_decays_to_zero():
    phase = PhaseConfig(
        name="p",
        mining="batch-hard",
        batch_size=8,
        steps=10,
        margin=0.2,
        lr=1.0,
        warmup_steps=4,
        distance="euclidean",
        fallback="hardest",
        chunk_size=8,
        on_collapse="warn",
    )
    warm = [get_lr(s, phase, "linear") for s in range(4)]
    assert warm == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert get_lr(4, phase, "linear") == pytest.approx(1.0)
    assert get_lr(9, phase, "linear") == pytest.approx(1.0 - 5 / 6)
    assert get_lr(7, phase, "none") == 1.0
    assert get_lr(4, phase, "cosine") == pytest.approx(1.0)
    assert get_lr(10, phase, "cosine") == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_train_runs_all_phases_and_writes_outputs(tmp_path, fmt):
    source = QUICKSTART_DATA
    if fmt == "parquet":
        import pyarrow.json as pj
        import pyarrow.parquet as pq

        source = tmp_path / "train.parquet"
        pq.write_table(pj.read_json(QUICKSTART_DATA), source)
    path = write_curriculum(tmp_path, source=source)
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    index = json.loads((run / "run.json").read_text())
    assert [p["status"] for p in index["phases"]] == ["done", "done", "done"]
    assert [p["dir"] for p in index["phases"]] == ["phase-0-semi-hard", "phase-1-hard-negative", "phase-2-batch-hard"]
    for phase, steps, batch in zip(index["phases"], (4, 3, 3), (16, 32, 64)):
        records = [json.loads(line) for line in (run / phase["dir"] / "metrics.jsonl").read_text().splitlines()]
        step_records = [r for r in records if "event" not in r]
        assert [r["step"] for r in step_records] == list(range(1, steps + 1))
        for r in step_records:
            assert r["mining"] == phase["mining"]
            for key in ("loss", "batch_hard_loss", "active_fraction", "mean_ap", "mean_an", "embedding_spread"):
                assert math.isfinite(r[key]), key
            # the batch-hard loss is the hardest: never below the mined loss of the same batch
            assert r["batch_hard_loss"] >= r["loss"] - 1e-6
        summary = json.loads((run / phase["dir"] / "summary.json").read_text())
        assert summary["steps_done"] == steps and summary["batch_size"] == batch
        assert (run / phase["dir"] / "checkpoint" / "COMPLETE").exists()
    # the encoder loads in plain transformers
    from transformers import AutoModel

    AutoModel.from_pretrained(run / "phase-2-batch-hard" / "checkpoint" / "model")


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


def test_refuses_to_overwrite_a_run_and_resume_needs_a_checkpoint(tmp_path):
    path = write_curriculum(tmp_path, steps=(1, 1, 1))
    runner = CliRunner()
    missing = runner.invoke(app, ["train", str(path), "--resume"])
    assert missing.exit_code == 2 and "no checkpoint" in missing.output
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    again = runner.invoke(app, ["train", str(path)])
    assert again.exit_code == 2 and "--resume" in again.output


def test_bad_source_fails_before_training(tmp_path):
    path = write_curriculum(tmp_path, source=tmp_path / "nowhere" / "*.jsonl")
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.layout=pairs", "data.samples_per_class=2"], "layout pairs would drop the negative column 'negative'"),
        (
            [],
            "columns 'text', 'label' not found; available columns: anchor, positive, negative; layout triplets would fit",
        ),
    ],
)
def test_layout_mismatch_fails_before_training_in_one_line(tmp_path, overrides, expected):
    from conftest import ASSETS

    path = write_curriculum(tmp_path, source=ASSETS / "triplets.jsonl")
    result = CliRunner().invoke(app, ["train", str(path), *overrides])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_sigterm_checkpoints_and_exits_cleanly_then_resumes(tmp_path):
    path = write_curriculum(tmp_path, steps=(400, 2, 2), checkpoint_every=0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tripletctl", "train", str(path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    metrics = tmp_path / "run" / "phase-0-semi-hard" / "metrics.jsonl"
    deadline = time.time() + 600  # a busy CI machine can take minutes to start up
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    assert metrics.exists(), "no step within the deadline"  # a SIGTERM during start-up saves nothing
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output
    state = json.loads((tmp_path / "run" / "phase-0-semi-hard" / "checkpoint" / "state.json").read_text())
    assert 2 <= state["step"] < 400
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert logged[-1]["step"] == state["step"]
    index = json.loads((tmp_path / "run" / "run.json").read_text())
    assert index["phases"][0]["status"] == "interrupted"
    # resume with fewer steps left to do: finish phase 0 quickly by overriding its length
    resumed = CliRunner().invoke(app, ["train", str(path), f"phases.0.steps={state['step'] + 1}", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["phases"][2]["status"] == "done"


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


# ---------------------------------------------------------------- until: phase end conditions


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


def test_resume_with_memory_matches_uninterrupted_run(tmp_path, interrupt_after=5):
    """A cross-batch memory in every phase (from step 1 on): the checkpoint holds the queue, so a run
    interrupted in phase 1, whose queue was carried over from phase 0, ends with the same weights."""
    memory = {"size": 48, "start_step": 1}
    straight = write_curriculum(tmp_path / "straight", checkpoint_every=3, memory=memory)
    assert train(load_curriculum(straight)) == 0
    broken = write_curriculum(tmp_path / "broken", checkpoint_every=3, memory=memory)
    assert train(load_curriculum(broken), max_steps=interrupt_after) == 0
    assert train(load_curriculum(broken), resume=True) == 0

    a, b = final_weights(tmp_path / "straight" / "run"), final_weights(tmp_path / "broken" / "run")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    queue = [
        torch.load(run / "phase-2-batch-hard" / "checkpoint" / "memory.pt", weights_only=True)
        for run in (tmp_path / "straight" / "run", tmp_path / "broken" / "run")
    ]
    for key in queue[0]:
        torch.testing.assert_close(queue[0][key], queue[1][key], rtol=0, atol=1e-6, msg=key)
    # the queue fills from step 0, is mined from start_step on, and carries into the next phase
    rows = {}
    for phase_dir in sorted((tmp_path / "straight" / "run").glob("phase-*")):
        records = [json.loads(line) for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]
        rows[phase_dir.name] = [r["memory_rows"] for r in records if "event" not in r]
    assert rows == {
        "phase-0-semi-hard": [0, 16, 32, 48],
        "phase-1-hard-negative": [0, 48, 48],
        "phase-2-batch-hard": [0, 48, 48],
    }

    # the memory changes what is learnt (so the comparison above can fail)
    plain = write_curriculum(tmp_path / "plain", checkpoint_every=3)
    assert train(load_curriculum(plain)) == 0
    c = final_weights(tmp_path / "plain" / "run")
    assert any(not torch.allclose(a[name], c[name], rtol=0, atol=1e-6) for name in a)
    assert not (tmp_path / "plain" / "run" / "phase-2-batch-hard" / "checkpoint" / "memory.pt").exists()


TRIPLET_RUNS = [  # every file variant trains; the mining modes rotate over them (test_mining checks each
    # mode on triplet batches against the brute force)
    ("jsonl", 1, "semi-hard"),
    ("parquet", 1, "hard-negative"),
    ("csv", 1, "batch-hard"),
    ("jsonl", 3, "batch-all"),
    ("parquet", 3, "random"),
    ("csv", 3, "semi-hard"),
]


@pytest.mark.parametrize("ext, negatives, mode", TRIPLET_RUNS)
def test_triplet_files_train_end_to_end(tmp_path, ext, negatives, mode):
    from conftest import ASSETS

    names = ["negative"] if negatives == 1 else [f"negative_{j + 1}" for j in range(negatives)]
    group = 2 + negatives
    spec = {
        "model": {"name": str(TINY_BERT), "init": "config", "pooling": "mean", "head": [16]},
        "data": {
            "source": str(ASSETS / f"{'triplets' if negatives == 1 else 'triplets3'}.{ext}"),
            "layout": "triplets",
            "negative_columns": names,
            "samples_per_class": 2,
            "shuffle_buffer": 64,
            "max_length": 16,
            "tokenizer_workers": 0,
        },
        "train": {
            "lr": 1e-3,
            "warmup_steps": 1,
            "seed": 3,
            "output_dir": str(tmp_path / "run"),
            "device": "cpu",
            "chunk_size": 16,
        },
        "phases": [{"name": mode, "mining": mode, "batch_size": 6 * group, "steps": 2}],
        "eval": {"source": str(ASSETS / "triplets_heldout.jsonl"), "layout": "triplets", "max_rows": 60},
    }
    path = tmp_path / "curriculum.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    index = json.loads((run / "run.json").read_text())
    assert [p["status"] for p in index["phases"]] == ["done"]
    records = [
        json.loads(line) for line in (run / index["phases"][0]["dir"] / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert math.isfinite(r["loss"]) and r["mining"] == mode
        assert r["skipped_anchors"] == 6 * negatives  # the given negatives, never anchors
    final = index["eval_final"]
    assert final["rows"] == 60 and final["given_triplets"] == 20 and 0 <= final["given_negative_accuracy"] <= 1


def one_phase(path: Path) -> Path:
    """Keep only the curriculum's first phase (16 rows a batch): the cheapest real run."""
    spec = yaml.safe_load(path.read_text())
    spec["phases"] = spec["phases"][:1]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


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


def test_resume_refuses_to_mix_configurations_inside_a_phase(tmp_path):
    path = write_curriculum(tmp_path, steps=(3, 1, 1), checkpoint_every=0)
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(path), "--max-steps", "2"]).exit_code == 0
    for override, key, old, new in [
        ("phases.0.batch_size=32", "batch_size", "16", "32"),
        ("phases.0.mining=batch-all", "mining", "'semi-hard'", "'batch-all'"),
        ("phases.0.margin=0.5", "margin", "0.2", "0.5"),
        ("phases.0.distance=squared-euclidean", "distance", "'euclidean'", "'squared-euclidean'"),
        ("phases.0.loss=soft-margin", "loss", "'margin'", "'soft-margin'"),
        ("data.samples_per_class=8", "data.samples_per_class", "4", "8"),
    ]:
        result = runner.invoke(app, ["train", str(path), override, "--resume"])
        assert result.exit_code == 2, result.output
        assert f"phases[0] (semi-hard) is half done (step 2 of 3): its {key} was {old} and is now {new}" in " ".join(
            result.output.split()
        ), result.output
    spec = yaml.safe_load(path.read_text())
    renamed = tmp_path / "renamed.yaml"
    spec["phases"][0]["name"] = "gentle"
    renamed.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["train", str(renamed), "--resume"])
    assert (
        result.exit_code == 2
        and "phases[0] was 'semi-hard' when the run was checkpointed and is 'gentle'" in " ".join(result.output.split())
    ), result.output
    assert not (tmp_path / "run" / "phase-0-gentle").exists()
    spec["phases"] = spec["phases"][1:]
    removed = tmp_path / "removed.yaml"
    removed.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["train", str(removed), "--resume"])
    assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit)
    assert "phases[0] was 'semi-hard'" in " ".join(result.output.split()), result.output
    # a chunk size is not a configuration of the phase: it may change
    assert (
        runner.invoke(app, ["train", str(path), "phases.0.chunk_size=8", "--resume", "--max-steps", "1"]).exit_code == 0
    )


def test_resume_refuses_another_memory_inside_a_phase(tmp_path):
    """Issue 23 #9: the queue went from 128 to 32 rows inside one phase; now refused like batch_size."""
    path = write_curriculum(tmp_path, steps=(3, 1, 1), checkpoint_every=0, memory={"size": 64})
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(path), "--max-steps", "2"]).exit_code == 0
    for override, key, old, new in [
        ("phases.0.memory={size: 32}", "memory.size", "64", "32"),
        ("phases.0.memory={size: 64, start_step: 1}", "memory.start_step", "0", "1"),
        ("phases.0.memory=null", "memory", "{'size': 64, 'start_step': 0}", "None"),
    ]:
        result = runner.invoke(app, ["train", str(path), override, "--resume"])
        assert result.exit_code == 2, result.output
        output = " ".join(result.output.split())
        assert output.count("error:") == 1 and "Traceback" not in output, result.output
        assert f"phases[0] (semi-hard) is half done (step 2 of 3): its {key} was {old} and is now {new};" in output
        assert f"Restore {key}," in output
    # the next phase may use another memory: only a half-done phase keeps its own
    assert runner.invoke(app, ["train", str(path), "phases.1.memory={size: 32}", "--resume"]).exit_code == 0


def test_resume_after_removing_the_last_started_phase_is_a_clear_error(tmp_path):
    path = write_curriculum(tmp_path, steps=(1, 4, 1), checkpoint_every=0)
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(path), "--max-steps", "2"]).exit_code == 0
    spec = yaml.safe_load(path.read_text())
    spec["phases"] = spec["phases"][:1]
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["train", str(path), "--resume"])
    assert result.exit_code == 2, result.output
    assert "the run stopped in phases[1] (hard-negative), but" in " ".join(result.output.split())
    assert "phases[1] (hard-negative) was removed" in " ".join(result.output.split())
