"""The GPU check's end-to-end part (bench/gpu_check.py, section e2e): `tripletctl train` of a
facenet-shaped curriculum on a corpus generated here, killed with SIGKILL mid-phase, `--resume`d, then
`tripletctl eval` and `tripletctl inspect-collapse` on the run; every exit code and the resumed
metrics become rows of the table."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gpu_check_base import BERT_BASE_VOCAB, QUICKSTART, TINY_BERT, Clock, Row, Sizes, one_line, run_logged


def _quickstart_generator():
    """curricula/quickstart/generate.py: its word and sentence makers build this corpus too."""
    spec = importlib.util.spec_from_file_location("quickstart_generate", QUICKSTART / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_corpus(directory: Path, sizes: Sizes) -> dict:
    """A labelled corpus of `topics` synthetic topics (quickstart's generator: signature words, twin
    topics sharing some, background words everywhere), a held-out file, and a BERT of `sizes.bert`'s
    shape whose WordPiece vocabulary is built here (padded with [unusedN] to BERT-base's 30522)."""
    gen = _quickstart_generator()
    rng = random.Random(22)
    taken: set[str] = set()
    background = gen._words(rng, 300, taken)
    signature = [gen._words(rng, 6, taken) for _ in range(sizes.topics)]
    shared = [gen._words(rng, 4, taken) for _ in range((sizes.topics + 1) // 2)]
    topics = [signature[t] + shared[t // 2] for t in range(sizes.topics)]
    train, heldout = [], []
    held_per_topic = max(2, math.ceil(sizes.heldout_rows / sizes.topics))
    for t, words in enumerate(topics):
        label = f"topic-{t:04d}"
        train += [{"text": gen.sentence(rng, words, background), "label": label} for _ in range(sizes.train_per_topic)]
        heldout += [{"text": gen.sentence(rng, words, background), "label": label} for _ in range(held_per_topic)]
    rng.shuffle(train)
    rng.shuffle(heldout)
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout[: sizes.heldout_rows])):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = specials + letters + ["##" + c for c in letters] + sorted(taken)
    if not sizes.smoke:  # BERT-base's embedding table, so the parameter count is BERT-base's
        vocab += [f"[unused{i}]" for i in range(BERT_BASE_VOCAB - len(vocab))]
    model = directory / "bert"
    model.mkdir(exist_ok=True)
    (model / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = {**sizes.bert, "vocab_size": len(vocab), "model_type": "bert", "architectures": ["BertModel"]}
    (model / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = json.loads((TINY_BERT / "tokenizer_config.json").read_text())
    tokenizer["model_max_length"] = config["max_position_embeddings"]
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2))
    h, n, i, v = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"], len(vocab)
    params = v * h + config["max_position_embeddings"] * h + n * (4 * h * h + 2 * h * i)
    return {"train_rows": len(train), "heldout_rows": min(len(heldout), sizes.heldout_rows), "params": params}


def write_curriculum(directory: Path, sizes: Sizes) -> Path:
    import yaml

    names = ("semi-hard", "hard-negative", "batch-hard")
    spec = {
        "model": {"name": "./bert", "init": "config", "pooling": "mean", "head": [256], "normalize": True},
        "data": {
            "source": "./train.jsonl",
            "text_column": "text",
            "label_column": "label",
            "shuffle_buffer": min(20000, sizes.topics * sizes.train_per_topic),
            "max_length": 32,
            "samples_per_class": 4,
            "tokenizer_workers": sizes.tokenizer_workers,
        },
        "train": {
            "lr": sizes.lr,
            "warmup_steps": 3,
            "seed": 0,
            "output_dir": str(directory / "run"),
            "checkpoint_every": sizes.checkpoint_every,
            "device": "auto",
            "chunk_size": "auto",
            "log_every": 1,
            "compile": sizes.e2e_compile,  # false by default here: compiling a 110 M BERT costs minutes
        },
        "phases": [
            {"name": name, "mining": name, "batch_size": batch, "margin": 0.2, "steps": steps}
            for name, batch, steps in zip(names, sizes.batches, sizes.steps)
        ],
        "eval": {"source": "./heldout.jsonl", "max_rows": sizes.heldout_rows},
    }
    path = directory / "facenet-shaped.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def step_records(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line being written when the process died
            continue
        if "event" not in record:
            out.append(record)
    return out


SECTION = "e2e"
CLI = [sys.executable, "-m", "tripletctl"]
KILL_PHASE = 1


def end_to_end(rows: list[Row], sizes: Sizes, env: dict, work: Path, clock: Clock) -> None:
    """Train, killed mid-phase 1; --resume; the resumed metrics; eval and inspect-collapse. A step
    that fails ends the section after its FAIL row."""
    e2e = work / "e2e"
    shutil.rmtree(e2e, ignore_errors=True)
    corpus = make_corpus(e2e, sizes)
    curriculum = write_curriculum(e2e, sizes)
    rows.append(
        Row(
            "INFO",
            SECTION,
            f"corpus {corpus['train_rows']} rows of {sizes.topics} topics; encoder {corpus['params'] / 1e6:.1f} M",
            f"batches {'/'.join(map(str, sizes.batches))}, steps {'/'.join(map(str, sizes.steps))}, "
            f"train.compile {str(sizes.e2e_compile).lower()}",
        )
    )
    killed = _train_killed(rows, sizes, env, e2e, curriculum, clock)
    if killed is None:
        return
    before_kill, saved_step = killed
    index = _resume(rows, env, e2e, curriculum, saved_step, clock)
    if index is None:
        return
    _resumed_metrics(rows, sizes, e2e / "run", index, before_kill, saved_step)
    _eval_and_inspect(rows, env, e2e, index, clock)


def _train_killed(
    rows: list[Row], sizes: Sizes, env: dict, e2e: Path, curriculum: Path, clock: Clock
) -> tuple[dict, int | None] | None:
    """1. train, killed with SIGKILL mid-phase 1: by the trainer's own fault point (core/faults.py), the
    same signal as `kill -9` but at a known step, so steps after the last checkpoint always re-run (a
    kill from outside, polled, can land right after a checkpoint on a loaded machine). Returns the
    steps logged before the kill and the step of the checkpoint it left, or None when it went wrong."""
    phase_dir = e2e / "run" / f"phase-{KILL_PHASE}-hard-negative"
    # the last checkpoint before the kill is at checkpoint_every; the steps after it (at least one) re-run
    kill_after = 2 * sizes.checkpoint_every - 1
    t0 = time.monotonic()
    log = (e2e / "train-killed.log").open("w")
    killed_env = {**env, "TRIPLETCTL_FAULT": f"step:{sizes.steps[0] + kill_after + 1}"}
    proc = subprocess.Popen(
        [*CLI, "train", str(curriculum)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=killed_env,
        cwd=e2e,
        start_new_session=True,
    )
    try:
        code = proc.wait(timeout=max(30.0, 0.5 * clock.left()))  # the rest: resume, eval, inspect-collapse
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    log.close()
    time.sleep(1.0)
    try:  # whatever the trainer left (its tokenizer workers should die with it)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    logged = step_records(phase_dir / "metrics.jsonl")
    killed_at = logged[-1]["step"] if logged and code == -signal.SIGKILL else None
    output = (e2e / "train-killed.log").read_text(errors="replace")
    ok = killed_at == kill_after
    rows.append(
        Row(
            "PASS" if ok else "FAIL",
            SECTION,
            f"train, kill -9 mid-phase {KILL_PHASE}: exit -9",
            f"killed after step {killed_at} of phase {KILL_PHASE} ({time.monotonic() - t0:.0f} s)"
            if ok
            else f"exit {code}, never reached step {kill_after} of phase {KILL_PHASE}: {one_line(output)}",
        )
    )
    if not ok:
        return None
    before_kill = {r["global_step"]: r for r in step_records(phase_dir / "metrics.jsonl")}
    state = json.loads((phase_dir / "checkpoint" / "state.json").read_text())
    return before_kill, state.get("step")


def _resume(
    rows: list[Row], env: dict, e2e: Path, curriculum: Path, saved_step: int | None, clock: Clock
) -> dict | None:
    """2. --resume: run.json's index when every phase finished, else None."""
    run = e2e / "run"
    t0 = time.monotonic()
    code, output = run_logged(
        [*CLI, "train", str(curriculum), "--resume"], e2e / "train-resume.log", env, 0.7 * clock.left(), cwd=e2e
    )
    index = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    statuses = [p.get("status") for p in index.get("phases", [])]
    rows.append(
        Row(
            "PASS" if code == 0 and statuses == ["done"] * 3 else "FAIL",
            SECTION,
            f"train --resume from step {saved_step} of phase {KILL_PHASE}: exit 0, 3 phases done",
            f"exit {code}, phases {statuses} ({time.monotonic() - t0:.0f} s)"
            + ("" if code == 0 else f": {one_line(output)}"),
        )
    )
    return index if code == 0 else None


def _resumed_metrics(
    rows: list[Row], sizes: Sizes, run: Path, index: dict, before_kill: dict, saved_step: int | None
) -> None:
    """3. the resumed metrics: every step once, and the steps run twice agree."""
    records = [r for d in sorted(run.glob("phase-*")) for r in step_records(d / "metrics.jsonl")]
    steps = [r["global_step"] for r in records]
    planned = sum(p["steps_done"] or 0 for p in index["phases"])
    rows.append(
        Row(
            "PASS" if steps == list(range(1, planned + 1)) else "FAIL",
            SECTION,
            "metrics.jsonl: every global step logged once, in order",
            f"{len(steps)} steps, {planned} done" if steps == list(range(1, planned + 1)) else f"steps {steps}",
        )
    )
    after = {r["global_step"]: r for r in records}
    rerun = sorted(g for g, r in before_kill.items() if r["phase_index"] == KILL_PHASE and r["step"] > saved_step)
    tolerance = 1e-5 if sizes.smoke else 2e-2  # CUDA kernels may sum in another order between processes
    worst, keys = 0.0, ("loss", "batch_hard_loss", "active_fraction", "embedding_spread")
    for g in rerun:
        for key in keys:
            a, b = before_kill[g][key], after[g][key]
            worst = max(worst, abs(a - b) / max(abs(a), 1e-3))
    if rerun:
        rows.append(
            Row(
                "PASS" if worst <= tolerance else "FAIL",
                SECTION,
                f"steps {rerun[0]}-{rerun[-1]} re-run after resume match the killed run's",
                f"max relative difference {worst:.2g} over {', '.join(keys)}",
                f"<= {tolerance:g}",
            )
        )
    else:
        rows.append(Row("INFO", SECTION, "no step ran twice (the kill landed right after a checkpoint)", ""))
    last = [r for r in records if r["phase_index"] == 2]
    if last:
        speed = statistics.median(r["samples_per_s"] for r in last if r.get("samples_per_s"))
        tokens = statistics.median(r["padded_tokens"] / r["real_tokens"] for r in last)
        kept = sum(bool(r["graph_kept"]) for r in last)
        rows.append(
            Row(
                "INFO",
                SECTION,
                f"phase 2 (batch {sizes.batches[2]}): median samples/s of the training loop",
                f"{speed:,.0f} samples/s, padded/real {tokens:.2f}, graphs kept {kept}/{len(last)} steps",
            )
        )


def _eval_and_inspect(rows: list[Row], env: dict, e2e: Path, index: dict, clock: Clock) -> None:
    """4. eval and inspect-collapse on the finished run."""
    run = e2e / "run"
    untrained = (index.get("eval_untrained") or {}).get("recall@1")
    t0 = time.monotonic()
    code, output = run_logged([*CLI, "eval", str(run), "--json"], e2e / "eval.log", env, clock.left() - 30, cwd=e2e)
    recall = None
    if code == 0:
        try:
            recall = json.loads(output[output.index("{") :])["recall@1"]
        except (ValueError, KeyError):
            pass
    improved = recall is not None and untrained is not None and recall > untrained
    rows.append(
        Row(
            "PASS" if code == 0 and improved else "FAIL",
            SECTION,
            "tripletctl eval: exit 0, held-out recall@1 above the untrained model's",
            f"exit {code}, recall@1 {untrained if untrained is None else f'{untrained:.3f}'} -> "
            f"{recall if recall is None else f'{recall:.3f}'} ({time.monotonic() - t0:.0f} s)"
            + ("" if code == 0 else f": {one_line(output)}"),
        )
    )
    t0 = time.monotonic()
    code, output = run_logged(
        [*CLI, "inspect-collapse", str(run), "--json", "--plot", str(e2e / "collapse.png")],
        e2e / "inspect-collapse.log",
        env,
        clock.left() - 20,
        cwd=e2e,
    )
    report = {}
    try:
        report = json.loads(output[output.index("{") :])
    except ValueError:
        pass
    verdict = report.get("verdict")
    expected = {"healthy": 0, "at risk": 1, "collapsed": 3}.get(verdict)
    reasons = report.get("reasons") or []
    rows.append(
        Row(
            "PASS" if code == expected else "FAIL",
            SECTION,
            "tripletctl inspect-collapse: a report, exit code = its verdict's (0 / 1 / 3)",
            f"exit {code}, verdict {verdict}, mean cosine {report.get('mean_cosine', float('nan')):.3f}"
            f" ({time.monotonic() - t0:.0f} s)" + ("" if code in (0, 1, 3) else f": {one_line(output)}"),
        )
    )
    if verdict != "healthy":  # a few dozen steps from random weights can still look like a cone
        rows.append(Row("INFO", SECTION, f"inspect-collapse reasons ({len(reasons)})", "; ".join(reasons)[:200]))
