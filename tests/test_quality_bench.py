"""bench/quality.py: its tripletctl rows are curricula the real validator accepts, at the row's budget;
its results are kept and joined by `--report` with intervals equal to a brute-force bootstrap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from tripletctl.cli import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402

BENCH = Path(quality.__file__)


@pytest.mark.parametrize("row", sorted(quality.TRIPLETCTL_ROWS))
@pytest.mark.parametrize("size", sorted(quality.SIZES))
def test_rows_validate_and_spend_the_budget(tmp_path, tiny_bert_dir, assets_dir, row, size):
    phases, overrides = quality.TRIPLETCTL_ROWS[row]
    budget = quality.SIZES[size]
    data = assets_dir / "many_class.jsonl"
    if size == "gpu":  # validate reads local data: a stand-in whose classes fill the GPU batches (1,024 rows)
        data = tmp_path / "stand-in.jsonl"
        data.write_text("".join(f'{{"text": "k{c} row {i}", "label": "k{c}"}}\n' for c in range(400) for i in range(8)))
    eval_file = None
    if row in quality.STOP_ROWS:
        data, eval_file = quality.split_for_eval(data, tmp_path / "split")
    plan = quality.curriculum(phases, overrides, data, tmp_path / "run", budget, 0, tiny_bert_dir, eval_file)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(plan))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    spent = sum(p["batch_size"] * p["steps"] for p in plan["phases"])
    assert abs(spent - budget.samples) <= 0.05 * budget.samples


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_the_gpu_size_without_a_gpu_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, str(BENCH), "--size", "gpu"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "--size gpu trains on a CUDA device and this machine has none" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_budget_below_one_batch_is_refused_with_exit_2():
    done = subprocess.run([sys.executable, str(BENCH), "--samples", "10"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "--samples must be at least the batch (64), got 10" in done.stderr


@pytest.mark.parametrize("row", ["tc-facenet", "tc-semi-hard"])
def test_a_larger_budget_scales_the_steps_not_the_batches(tmp_path, tiny_bert_dir, assets_dir, row):
    phases, overrides = quality.TRIPLETCTL_ROWS[row]
    cpu = quality.SIZES["cpu"]
    plans = [
        quality.curriculum(phases, overrides, assets_dir / "many_class.jsonl", tmp_path, size, 0, tiny_bert_dir)
        for size in (cpu, quality.dataclasses.replace(cpu, samples=4 * cpu.samples))
    ]
    assert [p["batch_size"] for p in plans[0]["phases"]] == [p["batch_size"] for p in plans[1]["phases"]]
    assert [4 * p["steps"] for p in plans[0]["phases"]] == [p["steps"] for p in plans[1]["phases"]]


def test_a_rows_own_samples_per_class_sizes_its_batches(tmp_path, tiny_bert_dir, assets_dir):
    """tc-facenet-mined-long-spc2: 2 rows a class + 2 mined, so the InfoNCE batch is a multiple of 4 (not 6)."""
    phases, overrides = quality.TRIPLETCTL_ROWS["tc-facenet-mined-long-spc2"]
    plan = quality.curriculum(
        phases, overrides, assets_dir / "many_class.jsonl", tmp_path, quality.SIZES["cpu"], 0, tiny_bert_dir
    )
    assert plan["data"]["samples_per_class"] == 2
    assert [p["batch_size"] for p in plan["phases"]] == [32, 128]  # 0.5 × 64 and 2 × 64, exact multiples
    four = quality.curriculum(
        *quality.TRIPLETCTL_ROWS["tc-facenet-mined-long"],
        assets_dir / "many_class.jsonl",
        tmp_path,
        quality.SIZES["cpu"],
        0,
        tiny_bert_dir,
    )
    assert [p["batch_size"] for p in four["phases"]] == [32, 126]  # 4 + 2 a class: 21 classes


def test_a_stop_row_trains_without_the_classes_its_eval_block_holds(tmp_path, tiny_bert_dir, assets_dir):
    """init's hold-out (a fifth of the classes, whole) and its stop (MAP@R flat for 2 evals) on the last phase."""
    source = assets_dir / "many_class.jsonl"
    train, held = quality.split_for_eval(source, tmp_path / "split")
    train_rows, held_rows = quality.read_rows(train), quality.read_rows(held)
    assert sorted(map(json.dumps, train_rows + held_rows)) == sorted(map(json.dumps, quality.read_rows(source)))
    held_labels = {r["label"] for r in held_rows}
    assert len(held_labels) == 20 and not held_labels & {r["label"] for r in train_rows}  # 100 classes
    assert quality.split_for_eval(source, tmp_path / "again")[1].read_text() == held.read_text()  # one split, any seed
    size = quality.dataclasses.replace(quality.SIZES["cpu"], samples=64000)
    plan = quality.curriculum(
        *quality.TRIPLETCTL_ROWS["tc-facenet-long-stop"], train, tmp_path, size, 1, tiny_bert_dir, held
    )
    assert plan["eval"] == {"source": str(held), "every": 50, "max_rows": 2000}  # nice(875 steps / 10)
    assert plan["phases"][-1]["until"] == {"eval_plateau": {"metric": "map@r", "patience": 2}}
    assert "until" not in plan["phases"][0]
    short = quality.dataclasses.replace(size, samples=2560)  # 30 steps: evals at phase ends only, no stop
    plan = quality.curriculum(
        *quality.TRIPLETCTL_ROWS["tc-facenet-long-stop"], train, tmp_path, short, 1, tiny_bert_dir, held
    )
    assert plan["eval"]["every"] == 0 and "until" not in plan["phases"][-1]


def test_the_init_row_makes_inits_choices_for_the_corpus_and_budget(tmp_path, tiny_bert_dir, assets_dir):
    """tc-init: a held-out block + keep_best only above 4 passes, and the rows a class and mined negatives
    that config/sizing.py picks for the classes left to train; its curriculum is then a named row's."""
    small = tmp_path / "small.jsonl"  # 1,000 classes of 2 or 3 rows: 2,500 texts
    small.write_text(
        "".join(f'{{"text": "k{c} row {i}", "label": "k{c}"}}\n' for c in range(1000) for i in range(2 + c % 2))
    )
    cpu = quality.SIZES["cpu"]
    for source, samples, named in [
        (small, 2560, "tc-facenet-mined-long-spc2"),  # 1 pass: no block; 1,000 classes ≥ 20 × 32: mined
        (small, 64000, "tc-facenet-mined-long-spc2-best"),  # 26 passes
        (assets_dir / "many_class.jsonl", 64000, "tc-facenet-long-best"),  # 100 classes: 4 a class, none mined
    ]:
        size = quality.dataclasses.replace(cpu, samples=samples)
        got = quality.row_plan(quality.INIT_ROW, source, tmp_path / "init" / named, size)
        want = quality.row_plan(named, source, tmp_path / named, size)
        assert (got[3] is None) == (named == "tc-facenet-mined-long-spc2") and got[2].read_text() == want[2].read_text()
        plans = [quality.curriculum(p, o, source, tmp_path, size, 0, tiny_bert_dir) for p, o, *_ in (got, want)]
        assert plans[0] == plans[1], named


def test_a_runs_evals_and_early_end_are_kept_from_its_metrics(tmp_path):
    phase = tmp_path / "run" / "p1-batch-all"
    phase.mkdir(parents=True)
    events = [
        {"event": "eval", "global_step": 550, "map@r": 0.41},
        {"event": "step", "global_step": 551, "loss": 1.0},
        {"event": "eval", "global_step": 500, "map@r": 0.4},
        {
            "event": "until",
            "phase": "p1-batch-all",
            "step": 150,
            "steps_planned": 375,
            "global_step": 650,
            "reason": "r",
        },
    ]
    (phase / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert quality.run_events(tmp_path / "run") == {
        "evals": [[500, 0.4], [550, 0.41]],
        "until": [{"phase": "p1-batch-all", "step": 150, "steps_planned": 375, "global_step": 650, "reason": "r"}],
    }
    assert quality.run_events(tmp_path / "nothing") == {}


CPU = quality.size_record("cpu", quality.SIZES["cpu"])
N_QUERIES = 40


def fake_result(out: Path, row: str, seed: int, values: dict[str, np.ndarray], size: dict = CPU) -> None:
    """A result folder as run_row writes it, from given per-query values."""
    folder = out / "fake" / row / f"seed-{seed}"
    folder.mkdir(parents=True)
    np.savez(folder / "per_query.npz", query_rows=2 * np.arange(N_QUERIES), **values)
    means = {name: float(v.mean()) for name, v in values.items()}
    result = {"corpus": "fake", "row": row, "seed": seed, "size": size, **means, "queries": N_QUERIES, "train_s": 10}
    (folder / "result.json").write_text(json.dumps(result))


def brute_force_interval(a: np.ndarray, b: np.ndarray) -> str:
    """B − A and its 95% percentile interval in points, one resample at a time (bootstrap.py's contract)."""
    d = b - a
    rng = np.random.default_rng(0)
    means = [d[rng.integers(0, d.size, size=d.size)].mean() for _ in range(2000)]
    low, high = np.quantile(means, [0.025, 0.975])
    return f"{100 * d.mean():+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def test_report_joins_means_and_intervals_of_one_size(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(7)
    hit_rates = {"zero-shot": 0.5, "st-semi-hard": 0.8, "st-batch-hard": 0.55, "st-mnrl": 0.6}
    map_shift = {"st-mnrl": 0.3, "tc-facenet": 0.2, "tc-semi-hard": 0.1}  # st-mnrl: the best anchor on MAP@R
    seeds = {"zero-shot": [0], "st-batch-hard": [0, 1], "tc-semi-hard": [0, 1]}
    values: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    rows = ["zero-shot", "st-semi-hard", "st-batch-hard", "st-mnrl", "tc-facenet", "tc-semi-hard"]
    for row in [*rows, "tc-facenet-long", "tc-facenet-mined-long"]:  # a lever's row and its base
        for seed in seeds.get(row, [0, 1, 2]):
            v = {
                "recall@1": (rng.random(N_QUERIES) < hit_rates.get(row, 0.7)).astype(float),
                "map@r": 0.5 * rng.random(N_QUERIES) + map_shift.get(row, 0.0),
            }
            values.setdefault(row, {})[seed] = v
            fake_result(tmp_path, row, seed, v)
    other = {"recall@1": np.ones(N_QUERIES), "map@r": np.ones(N_QUERIES)}
    fake_result(tmp_path, "tc-infonce", 0, other, quality.size_record("smoke", quality.SIZES["smoke"]))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--size", "cpu", "--report", "--out", str(tmp_path)])
    quality.main()
    printed = capsys.readouterr().out

    assert "tc-infonce" not in printed and "1 results of other sizes left out" in printed
    for row, by_seed in values.items():
        cells = []
        for metric in quality.METRICS:
            means = [v[metric].mean() for v in by_seed.values()]
            sd = f"{np.std(means, ddof=1):.4f}" if len(means) > 1 else "-"
            cells.append(f"{np.mean(means):.4f} ± {sd}")
        assert f"| {row} | {len(by_seed)} | {cells[0]} | {cells[1]} | 10 |" in printed

    def expected(row: str, reference: str, why: str, metric: str, shared: list[int]) -> str:
        a = np.mean([values[reference][s][metric] for s in shared], axis=0)
        b = np.mean([values[row][s][metric] for s in shared], axis=0)
        per_seed = " ".join(
            f"{100 * (values[row][s][metric].mean() - values[reference][s][metric].mean()):+.2f}" for s in shared
        )
        seeds_text = ",".join(map(str, shared))
        return f"- {row} − {reference}{why}, {metric}, seeds {seeds_text}: {brute_force_interval(a, b)}; per seed {per_seed}:"

    lines = [
        expected("tc-facenet", "st-semi-hard", " (best anchor)", "recall@1", [0, 1, 2]),
        expected("tc-facenet", "st-mnrl", " (best anchor)", "map@r", [0, 1, 2]),
        expected("tc-semi-hard", "st-semi-hard", " (best anchor)", "recall@1", [0, 1]),
        expected("tc-semi-hard", "tc-facenet", "", "recall@1", [0, 1]),
        expected("tc-semi-hard", "tc-facenet", "", "map@r", [0, 1]),
        expected("tc-facenet-mined-long", "tc-facenet-long", " (the same shape without the lever)", "map@r", [0, 1, 2]),
    ]
    for line in lines:
        assert line in printed, f"{line!r} not in\n{printed}"
    assert "tc-facenet − tc-facenet" not in printed and "st-batch-hard (best anchor)" not in printed


def test_a_kept_result_is_not_run_again_and_another_size_is_refused(tmp_path, monkeypatch, capsys):
    def train_row(*args):
        raise RuntimeError("trained")

    monkeypatch.setattr(quality, "train_row", train_row)
    fake_result(tmp_path, "tc-facenet", 0, {"recall@1": np.ones(N_QUERIES), "map@r": np.ones(N_QUERIES)})
    files = (tmp_path / "train.jsonl", tmp_path / "heldout.jsonl")
    kept = quality.run_row("tc-facenet", "fake", files, tmp_path, CPU, 0, force=False, keep=False)
    assert kept["kept"] and kept["recall@1"] == 1.0
    smoke = quality.size_record("smoke", quality.SIZES["smoke"])
    with pytest.raises(SystemExit) as refused:
        quality.run_row("tc-facenet", "fake", files, tmp_path, smoke, 0, force=False, keep=False)
    assert refused.value.code == 2 and "holds a result of another size" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="trained"):
        quality.run_row("tc-facenet", "fake", files, tmp_path, smoke, 0, force=True, keep=False)


def test_kill_of_the_bench_takes_its_training_child_with_it(tmp_path):
    """A stand-in for `tripletctl train` (a long sleep) under exit_on_term: SIGTERM to the bench process
    must end the child too, not leave it running."""
    script = (
        f"import sys, subprocess; sys.path.insert(0, {str(BENCH.parent)!r}); import quality\n"
        "quality.exit_on_term()\n"
        "subprocess.run([sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); time.sleep(60)'])\n"
    )
    bench = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(bench.stdout.readline())
    try:
        bench.terminate()
        assert bench.wait(timeout=20) == 143
        deadline = time.monotonic() + 10
        while running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(child), f"the training child {child} outlived the bench"
    finally:
        if running(child):
            os.kill(child, signal.SIGKILL)


def running(pid: int) -> bool:
    """Alive and not a zombie (Linux /proc: CI's machine and this one)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
