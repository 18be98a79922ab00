"""The GPU check: one command that proves tripletctl's GPU path end to end and measures it, in one table.

    python bench/gpu_check.py            # on a CUDA machine: about 8 minutes on one H100 / H200
    python bench/gpu_check.py --smoke    # anywhere (CPU): the same script at tiny sizes, about a minute

It installs nothing from the network: wheels the device image lacks travel in the git-ignored `.whl/`
folder (`bench/fetch_gpu_wheels.sh` fills it) and are installed with
`pip install --no-index --no-deps --target /tmp/site` when present. It prints ONE PASS/FAIL table:

  (a) cuda     the `cuda` pytest tests (tests/test_cuda.py): bf16 mining, chunked gradient caching under
               autocast, the chunk probe, kept graphs, memory flat in the batch, fused AdamW, compile,
               resume equality on the device;
  (b) e2e      `tripletctl train` of a facenet-shaped curriculum (semi-hard -> hard-negative -> batch-hard,
               batches 500 -> 1000 -> 2000) on a corpus generated here, with a BERT-base-sized encoder
               built from a config, `kill -9` mid-phase, `--resume`, then `tripletctl eval` and
               `tripletctl inspect-collapse`: every exit code and the resumed metrics checked;
  (c) perf     MFU (6*N*T, as bench/train_step.py) at batch 2000 on fixed 128-token rows and samples/s
               on long-tailed (log-normal) rows, each beside the padded one-chunk step, and each speed
               switch (torch.compile, fused AdamW, kept graphs) on and off;
  (d) st       samples/s beside sentence-transformers' BatchHardTripletLoss and
               CachedMultipleNegativesRankingLoss on the same model, batch and rows.

Sections run in that order under one time budget (`--budget-s`); what the budget leaves no time for is a
SKIP row, never a hang. The step measurements run bench/train_step.py's worker (each configuration in
its own process on CUDA, so peaks and OOMs stay per configuration). Exit code 1 when any row FAILs.
The table and every figure also go to --out (default $OUT when set, else /tmp/gpu_check).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import train_step  # noqa: E402  (bench/train_step.py: the step worker, the synthetic rows, the MFU peak table)

WHEELS = REPO / ".whl"
SITE = Path("/tmp/site")
QUICKSTART = REPO / "curricula" / "quickstart"
TINY_BERT = QUICKSTART / "tiny-bert"
TARGET_MFU = 0.45  # issue 22, BERT-base, seq 128, batch 2000, H100/H200
TARGET_PADDING = 1.10  # computed / real tokens on long-tailed rows
TARGET_LONG_SPEEDUP = 2.5  # token chunks vs the padded one-chunk step, long-tailed rows
TARGET_VS_ST = 1.5  # tripletctl vs sentence-transformers' BatchHardTripletLoss at batch 512
BERT_BASE_VOCAB = 30522
CHECK_WIDTH = 84  # the table stays readable in a 12,000-character output tail


@dataclass
class Row:
    verdict: str  # PASS, FAIL, SKIP, INFO
    section: str
    check: str
    figure: str = ""
    target: str = ""


@dataclass
class Sizes:
    """Everything that differs between the GPU run and --smoke."""

    smoke: bool
    budget_s: float
    # (b) the end-to-end run
    topics: int
    train_per_topic: int
    heldout_rows: int
    batches: tuple[int, int, int]
    steps: tuple[int, int, int]
    checkpoint_every: int
    tokenizer_workers: int
    lr: float
    bert: dict
    # (c), (d) the step measurements
    step_model: str
    fixed_len: int
    long_max: int
    big_batch: int
    small_batch: int
    timed_steps: int
    warmup: int
    e2e_reserve_s: float
    e2e_compile: bool | str
    cuda_tests_s: float
    st_mini_batch: int


def sizes_for(smoke: bool, budget_s: float | None) -> Sizes:
    if smoke:
        tiny = json.loads((TINY_BERT / "config.json").read_text())
        return Sizes(
            smoke=True,
            budget_s=budget_s or 420,
            topics=40,
            train_per_topic=24,
            heldout_rows=200,
            batches=(16, 32, 64),
            steps=(6, 8, 6),
            checkpoint_every=2,
            tokenizer_workers=0,
            lr=1e-3,
            bert={**tiny, "max_position_embeddings": 64},
            step_model=str(TINY_BERT),
            fixed_len=32,
            long_max=32,
            big_batch=64,
            small_batch=32,
            timed_steps=1,
            warmup=1,
            e2e_reserve_s=90,
            e2e_compile=False,
            cuda_tests_s=150,
            st_mini_batch=16,
        )
    return Sizes(
        smoke=False,
        budget_s=budget_s or 480,
        topics=1200,
        train_per_topic=40,
        heldout_rows=2000,
        batches=(500, 1000, 2000),
        steps=(6, 8, 4),
        checkpoint_every=3,
        tokenizer_workers=4,
        lr=1e-4,
        bert={**train_step.BERT_BASE, "architectures": ["BertModel"]},
        step_model="bert-base-config",
        fixed_len=128,
        long_max=64,
        big_batch=2000,
        small_batch=512,
        timed_steps=4,
        warmup=2,
        e2e_reserve_s=150,
        e2e_compile=False,
        cuda_tests_s=170,
        st_mini_batch=256,
    )


class Clock:
    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


# ------------------------------------------------------------------------------- environment


def install_wheels(rows: list[Row]) -> dict[str, str]:
    """pip-install the carried wheels into /tmp/site (no index, no deps) and put it first on the path."""
    env = dict(os.environ)
    wheels = sorted(WHEELS.glob("*.whl"))
    if wheels:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        cmd += ["--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        ok = proc.returncode == 0
        rows.append(
            Row(
                "PASS" if ok else "FAIL",
                "env",
                f"install {len(wheels)} carried wheels into {SITE}",
                ", ".join(w.name.split("-")[0] for w in wheels) if ok else one_line(proc.stderr),
            )
        )
        if ok:
            sys.path.insert(0, str(SITE))
            env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("PYTHONPATH", str(REPO))
    if str(REPO) not in env["PYTHONPATH"].split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env["PYTHONPATH"]])
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def environment(rows: list[Row], env: dict[str, str]) -> dict:
    """Versions and the device, read in a child process (this one never touches CUDA)."""
    probe = (
        "import json, importlib.metadata as m, torch\n"
        "out = {'torch': torch.__version__, 'cuda': torch.cuda.is_available()}\n"
        "out['device'] = torch.cuda.get_device_name(0) if out['cuda'] else 'CPU'\n"
        "for name in ('transformers', 'datasets', 'sentence-transformers', 'pyarrow', 'tokenizers'):\n"
        "    try:\n"
        "        out[name] = m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        out[name] = None\n"
        "for module in ('datasets', 'sentence_transformers', 'tripletctl.cli'):\n"
        "    try:\n"
        "        __import__(module)\n"
        "    except Exception as e:\n"
        "        out['import ' + module] = type(e).__name__ + ': ' + str(e)[:200]\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        rows.append(Row("FAIL", "env", "python, torch and the packages import", one_line(proc.stderr)))
        return {"cuda": False, "device": "unknown"}
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    broken = {k: v for k, v in info.items() if k.startswith("import ")}
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "transformers", "datasets", "sentence-transformers"))
    rows.append(
        Row(
            "FAIL" if broken else "PASS",
            "env",
            f"device {info['device']}; tripletctl, datasets, sentence-transformers import",
            "; ".join(broken.values()) if broken else versions,
        )
    )
    return info


def one_line(text: str, limit: int = 160) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:limit]


def run_logged(cmd: list[str], log: Path, env: dict, timeout: float, cwd: Path = REPO) -> tuple[int | None, str]:
    """Run to completion (or `timeout`), output to `log`; returns (exit code or None on timeout, output)."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, log.read_text(errors="replace")


# ------------------------------------------------------------------------------- (a) the cuda tests


def cuda_tests(rows: list[Row], sizes: Sizes, env: dict, work: Path, clock: Clock, on_cuda: bool) -> None:
    if not on_cuda and not sizes.smoke:
        rows.append(Row("SKIP", "cuda", "tests/test_cuda.py", "no CUDA device (run with --smoke on a CPU)"))
        return
    xml = work / "cuda-tests.xml"
    test_env = dict(env)
    if not on_cuda:
        test_env["TRIPLETCTL_CUDA_TESTS_ON_CPU"] = "1"  # --smoke: what can run on the CPU runs there
        test_env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"]
    cmd += ["-o", "addopts=", f"--junitxml={xml}"]
    limit = min(clock.left() - 60, sizes.cuda_tests_s)
    code, output = run_logged(cmd, work / "cuda-tests.log", test_env, timeout=limit)
    if code is not None and xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = case.get("name", "?")
            seconds = float(case.get("time") or 0)
            failed = case.find("failure") if case.find("failure") is not None else case.find("error")
            skipped = case.find("skipped")
            if failed is not None:
                verdict, figure = "FAIL", one_line(failed.get("message") or failed.text or "")
            elif skipped is not None:
                verdict, figure = "SKIP", one_line(skipped.get("message") or "")
            else:
                verdict, figure = "PASS", f"{seconds:.1f} s"
            rows.append(Row(verdict, "cuda", name.removeprefix("test_"), figure))
        return
    # timed out (or pytest died): what the verbose log says finished, then the reason
    done = re.findall(r"^tests/test_cuda\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", output, flags=re.M)
    for name, outcome in done:
        verdict = {"PASSED": "PASS", "SKIPPED": "SKIP"}.get(outcome, "FAIL")
        rows.append(Row(verdict, "cuda", name.removeprefix("test_"), outcome.lower()))
    why = f"timed out after {limit:.0f} s" if code is None else f"pytest exited {code}: {one_line(output)}"
    rows.append(Row("FAIL", "cuda", f"tests/test_cuda.py ({len(done)} tests finished)", why))


# ------------------------------------------------------------------------------- (b) end to end


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


def end_to_end(rows: list[Row], sizes: Sizes, env: dict, work: Path, clock: Clock) -> None:
    section = "e2e"
    e2e = work / "e2e"
    shutil.rmtree(e2e, ignore_errors=True)
    corpus = make_corpus(e2e, sizes)
    curriculum = write_curriculum(e2e, sizes)
    run = e2e / "run"
    rows.append(
        Row(
            "INFO",
            section,
            f"corpus {corpus['train_rows']} rows of {sizes.topics} topics; encoder {corpus['params'] / 1e6:.1f} M",
            f"batches {'/'.join(map(str, sizes.batches))}, steps {'/'.join(map(str, sizes.steps))}, "
            f"train.compile {str(sizes.e2e_compile).lower()}",
        )
    )
    cli = [sys.executable, "-m", "tripletctl"]
    kill_phase = 1
    phase_dir = run / f"phase-{kill_phase}-hard-negative"
    # the last checkpoint before the kill is at checkpoint_every; the steps after it (at least one) re-run
    kill_after = 2 * sizes.checkpoint_every - 1

    # 1. train, killed with SIGKILL mid-phase 1: by the trainer's own fault point (core/faults.py), the
    #    same signal as `kill -9` but at a known step, so steps after the last checkpoint always re-run
    #    (a kill from outside, polled, can land right after a checkpoint on a loaded machine)
    t0 = time.monotonic()
    log = (e2e / "train-killed.log").open("w")
    killed_env = {**env, "TRIPLETCTL_FAULT": f"step:{sizes.steps[0] + kill_after + 1}"}
    proc = subprocess.Popen(
        [*cli, "train", str(curriculum)],
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
            section,
            f"train, kill -9 mid-phase {kill_phase}: exit -9",
            f"killed after step {killed_at} of phase {kill_phase} ({time.monotonic() - t0:.0f} s)"
            if ok
            else f"exit {code}, never reached step {kill_after} of phase {kill_phase}: {one_line(output)}",
        )
    )
    if not ok:
        return
    before_kill = {r["global_step"]: r for r in step_records(phase_dir / "metrics.jsonl")}
    state = json.loads((phase_dir / "checkpoint" / "state.json").read_text())
    saved_step = state.get("step")

    # 2. --resume
    t0 = time.monotonic()
    code, output = run_logged(
        [*cli, "train", str(curriculum), "--resume"], e2e / "train-resume.log", env, 0.7 * clock.left(), cwd=e2e
    )
    index = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    statuses = [p.get("status") for p in index.get("phases", [])]
    rows.append(
        Row(
            "PASS" if code == 0 and statuses == ["done"] * 3 else "FAIL",
            section,
            f"train --resume from step {saved_step} of phase {kill_phase}: exit 0, 3 phases done",
            f"exit {code}, phases {statuses} ({time.monotonic() - t0:.0f} s)"
            + ("" if code == 0 else f": {one_line(output)}"),
        )
    )
    if code != 0:
        return

    # 3. the resumed metrics: every step once, and the steps run twice agree
    records = [r for d in sorted(run.glob("phase-*")) for r in step_records(d / "metrics.jsonl")]
    steps = [r["global_step"] for r in records]
    planned = sum(p["steps_done"] or 0 for p in index["phases"])
    rows.append(
        Row(
            "PASS" if steps == list(range(1, planned + 1)) else "FAIL",
            section,
            "metrics.jsonl: every global step logged once, in order",
            f"{len(steps)} steps, {planned} done" if steps == list(range(1, planned + 1)) else f"steps {steps}",
        )
    )
    after = {r["global_step"]: r for r in records}
    rerun = sorted(g for g, r in before_kill.items() if r["phase_index"] == kill_phase and r["step"] > saved_step)
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
                section,
                f"steps {rerun[0]}-{rerun[-1]} re-run after resume match the killed run's",
                f"max relative difference {worst:.2g} over {', '.join(keys)}",
                f"<= {tolerance:g}",
            )
        )
    else:
        rows.append(Row("INFO", section, "no step ran twice (the kill landed right after a checkpoint)", ""))
    last = [r for r in records if r["phase_index"] == 2]
    if last:
        speed = statistics.median(r["samples_per_s"] for r in last if r.get("samples_per_s"))
        tokens = statistics.median(r["padded_tokens"] / r["real_tokens"] for r in last)
        kept = sum(bool(r["graph_kept"]) for r in last)
        rows.append(
            Row(
                "INFO",
                section,
                f"phase 2 (batch {sizes.batches[2]}): median samples/s of the training loop",
                f"{speed:,.0f} samples/s, padded/real {tokens:.2f}, graphs kept {kept}/{len(last)} steps",
            )
        )

    # 4. eval and inspect-collapse on the finished run
    untrained = (index.get("eval_untrained") or {}).get("recall@1")
    t0 = time.monotonic()
    code, output = run_logged([*cli, "eval", str(run), "--json"], e2e / "eval.log", env, clock.left() - 30, cwd=e2e)
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
            section,
            "tripletctl eval: exit 0, held-out recall@1 above the untrained model's",
            f"exit {code}, recall@1 {untrained if untrained is None else f'{untrained:.3f}'} -> "
            f"{recall if recall is None else f'{recall:.3f}'} ({time.monotonic() - t0:.0f} s)"
            + ("" if code == 0 else f": {one_line(output)}"),
        )
    )
    t0 = time.monotonic()
    code, output = run_logged(
        [*cli, "inspect-collapse", str(run), "--json", "--plot", str(e2e / "collapse.png")],
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
            section,
            "tripletctl inspect-collapse: a report, exit code = its verdict's (0 / 1 / 3)",
            f"exit {code}, verdict {verdict}, mean cosine {report.get('mean_cosine', float('nan')):.3f}"
            f" ({time.monotonic() - t0:.0f} s)" + ("" if code in (0, 1, 3) else f": {one_line(output)}"),
        )
    )
    if verdict != "healthy":  # a few dozen steps from random weights can still look like a cone
        rows.append(Row("INFO", section, f"inspect-collapse reasons ({len(reasons)})", "; ".join(reasons)[:200]))


# ------------------------------------------------------------------------------- (c), (d) step measurements


def st_worker(cfg: dict) -> dict:
    """One sentence-transformers step configuration on the same model, batch and rows as train_step's."""
    import resource

    import torch
    from sentence_transformers import SentenceTransformer, losses, models

    threads = cfg.get("threads") or 0
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg["device"] != "cpu" else "cpu")
    bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model_dir = Path(cfg["model_dir"])
    if not (model_dir / "config.json").exists():  # the same random encoder as train_step's, saved once
        triplet, _ = train_step.build_model(cfg["model"], "cpu", "sdpa")
        triplet.encoder.save_pretrained(model_dir)
        shutil.copy(TINY_BERT / "vocab.txt", model_dir / "vocab.txt")
        shutil.copy(TINY_BERT / "tokenizer_config.json", model_dir / "tokenizer_config.json")
    transformer = models.Transformer(str(model_dir), max_seq_length=cfg["max_length"])
    hidden = transformer.get_word_embedding_dimension()
    model = SentenceTransformer(modules=[transformer, models.Pooling(hidden, "mean"), models.Normalize()])
    model = model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    if cfg["loss"] == "batch-hard":
        loss_fn = losses.BatchHardTripletLoss(model, margin=0.2)
    else:
        loss_fn = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=cfg["mini_batch"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    batch = cfg["batch"]
    labels = (torch.arange(batch) % max(1, batch // train_step.PER_CLASS)).to(device)
    vocab = model[0].auto_model.config.vocab_size
    batches = train_step.synthetic_batches(cfg, batch, vocab)

    def features(ids, lengths, rows=None):
        """Padded to the longest row, as sentence-transformers' collator does."""
        width = int(lengths.max())
        padded = torch.zeros(len(lengths), width, dtype=torch.long)
        mask = torch.arange(width)[None, :] < lengths[:, None]
        padded[mask] = ids
        if rows is not None:
            padded, mask = padded[rows], mask[rows]
        return {"input_ids": padded.to(device), "attention_mask": mask.long().to(device)}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, real = [], 0
    try:
        for i, (ids, lengths) in enumerate(batches):
            sync()
            start = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                if cfg["loss"] == "batch-hard":
                    loss = loss_fn([features(ids, lengths)], labels)
                else:  # B texts as B/2 (anchor, positive) pairs: the same texts per step
                    rows = torch.arange(batch)
                    anchors, positives = features(ids, lengths, rows[0::2]), features(ids, lengths, rows[1::2])
                    loss = loss_fn([anchors, positives], labels[: batch // 2])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if i >= cfg["warmup"]:
                times.append(time.perf_counter() - start)
                real += int(lengths.sum())
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    step_s = statistics.median(times)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "step_s": step_s,
        "samples_per_s": batch / step_s,
        "peak_mb": peak_mb,
        "params": params,
        "real_tokens": real / len(times),
        "device_type": device.type,
    }


def measure(configs: list[dict], env: dict, clock: Clock, separate: bool, work: Path) -> list[dict]:
    """Run each configuration (in its own process when `separate`, else all in one helper process);
    a configuration the budget leaves no time for gets {"skipped": ...}."""
    results: list[dict] = []
    if not separate:
        script = work / "configs.json"
        script.write_text(json.dumps(configs))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run-configs", str(script)]
        code, output = run_logged(cmd, work / "configs.log", env, timeout=clock.left() - 10)
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        results = [json.loads(line[len("RESULT ") :]) for line in lines]
        if code != 0:
            error = "timed out" if code is None else f"exited {code}: {one_line(output)}"
            results += [{"error": error}] * (len(configs) - len(results))
        return results
    for cfg in configs:
        left = clock.left() - 20
        if left < cfg.get("needs_s", 30):
            results.append({"skipped": f"time budget ({max(left, 0):.0f} s left)"})
            continue
        cfg = {**cfg, "timeout_s": left}
        if cfg["kind"] == "st":
            cmd = [sys.executable, str(Path(__file__).resolve()), "--st-worker", json.dumps(cfg)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=left)
                if proc.returncode == 0:
                    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                else:
                    results.append({"error": f"exited {proc.returncode}: {one_line(proc.stderr)}"})
            except subprocess.TimeoutExpired:
                results.append({"error": f"timed out after {left:.0f} s"})
        else:
            saved = dict(os.environ)
            os.environ.update(env)  # run_worker starts its subprocess with this process's environment
            try:
                results.append(train_step.run_worker(cfg))
            finally:
                os.environ.clear()
                os.environ.update(saved)
    return results


def run_configs_here(path: Path) -> int:
    """--run-configs: every configuration of the file in this process, one RESULT line each (smoke)."""
    for cfg in json.loads(path.read_text()):
        try:
            result = st_worker(cfg) if cfg["kind"] == "st" else train_step.worker(cfg)
        except Exception as e:  # reported in the table, not a traceback that hides the rest
            result = {"error": f"{type(e).__name__}: {one_line(str(e))}"}
        print("RESULT " + json.dumps(result), flush=True)
    return 0


def step_configs(sizes: Sizes, on_cuda: bool, work: Path) -> list[tuple[str, dict]]:
    """(name, cfg) in priority order: what the budget cuts first comes last."""
    base = {
        "kind": "tripletctl",
        "model": sizes.step_model,
        "attn": "sdpa",
        "device": "auto",
        "precision": "auto",
        "threads": 1 if sizes.smoke else 0,
        "mining": "batch-hard",
        "steps": sizes.timed_steps,
        "warmup": sizes.warmup,
        "chunk_size": 32,
        "chunk_tokens": "auto",
        "median": 12.0,
        "sigma": 0.5,
        "overhead": None,
        "compile": on_cuda,  # tripletctl's default on CUDA (train.compile: auto)
        "fused": True,
        "keep_graph": True,
        "needs_s": 30,
    }
    fixed = {"lengths": "fixed", "max_length": sizes.fixed_len}
    long = {"lengths": "lognormal", "max_length": sizes.long_max}
    big, small = sizes.big_batch, sizes.small_batch
    st = {
        **base,
        **fixed,
        "kind": "st",
        "model_dir": str(work / "st-model"),
        "mini_batch": sizes.st_mini_batch,
        "compile": False,
    }
    configs = [
        ("fixed-padded", {**base, **fixed, "batch": big, "mode": "padded", "compile": False}),
        ("fixed-default", {**base, **fixed, "batch": big, "mode": "tokens", "needs_s": 120}),
        ("long-padded", {**base, **long, "batch": big, "mode": "padded", "compile": False}),
        ("long-tokens", {**base, **long, "batch": big, "mode": "tokens", "compile": False}),
        ("st-batch-hard-small", {**st, "batch": small, "loss": "batch-hard"}),
        ("st-batch-hard-big", {**st, "batch": big, "loss": "batch-hard"}),
        ("small-default", {**base, **fixed, "batch": small, "mode": "tokens", "needs_s": 90}),
        ("st-cached-mnrl-big", {**st, "batch": big, "loss": "cached-mnrl"}),
        ("st-cached-mnrl-small", {**st, "batch": small, "loss": "cached-mnrl", "extra": True}),
    ]
    if on_cuda:  # the switches, each off against the default run above
        extra = {**base, "extra": True, "batch": big, "mode": "tokens"}
        configs += [
            ("fixed-no-compile", {**extra, **fixed, "compile": False}),
            ("fixed-no-fused", {**extra, **fixed, "fused": False, "needs_s": 60}),
            ("fixed-no-keep", {**extra, **fixed, "keep_graph": False, "needs_s": 60}),
            ("long-tokens-compiled", {**extra, **long, "needs_s": 120}),
            ("long-unpadded", {**extra, **long, "compile": False, "unpadded": True}),
        ]
    return configs


def mfu(result: dict, peak_tflops: float | None) -> float | None:
    if not peak_tflops or "step_s" not in result:
        return None
    return 6 * result["params"] * result["real_tokens"] / result["step_s"] / (peak_tflops * 1e12)


def describe(result: dict | None) -> str:
    if result is None:
        return "not run"
    if result.get("oom"):
        return "OOM"
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    if "error" in result:
        return f"error: {result['error']}"
    return f"{result['samples_per_s']:,.0f} samples/s"


def measure_named(
    named: list[tuple[str, dict]], env: dict, clock: Clock, on_cuda: bool, work: Path, reserve_s: float, got: dict
) -> None:
    """Measure `named` configurations into `got`, leaving `reserve_s` of the budget for what follows."""
    if not named:
        return
    inner = Clock(clock.left() - reserve_s)
    results = measure([c for _, c in named], env, inner, separate=on_cuda, work=work)
    got.update(zip([n for n, _ in named], results))
    steps = work / "steps.json"
    saved = json.loads(steps.read_text()) if steps.exists() else []
    saved += [{"name": n, **c, **r} for (n, c), r in zip(named, results)]
    steps.write_text(json.dumps(saved, indent=1))


def performance(rows: list[Row], sizes: Sizes, named: list[tuple[str, dict]], got: dict, info: dict) -> None:
    """The (c) perf and (d) st rows from the measured configurations `got`."""
    on_cuda = bool(info.get("cuda"))
    results = [got.get(n) for n, _ in named]
    peak = train_step.peak_tflops(info.get("device", ""), None) if on_cuda else None

    def ran(name: str) -> dict | None:
        r = got.get(name)
        return r if r and "step_s" in r else None

    def judged(ok: bool) -> str:
        return ("PASS" if ok else "FAIL") if on_cuda else "PASS"  # --smoke: it ran; targets are for the GPU

    note = "" if on_cuda else " (smoke: ran)"
    big, small, fixed_len = sizes.big_batch, sizes.small_batch, sizes.fixed_len
    for (name, cfg), r in zip(named, results):
        if not ran(name):
            baseline = cfg["kind"] == "st" or cfg["mode"] == "padded"  # may run out of memory: that is a figure
            if r is None or "skipped" in r:
                verdict = "SKIP"
            else:
                verdict = "INFO" if r.get("oom") and baseline else "FAIL"
            rows.append(Row(verdict, "perf", f"step {name}", describe(r)))

    # (c) MFU at the big batch, fixed rows, beside the padded one-chunk step
    default, padded = ran("fixed-default"), ran("fixed-padded")
    if default:  # the padded one-chunk step may run out of memory at this batch: then it says OOM
        m, m_pad = mfu(default, peak), mfu(padded, peak) if padded else None
        figure = (
            f"tripletctl {default['samples_per_s']:,.0f} samples/s"
            + (f" MFU {m:.1%}" if m is not None else "")
            + f" (chunks {default['chunks']:.0f}, graph {'kept' if default['kept'] == 1 else 'cached'}); "
            f"padded one-chunk eager {describe(got.get('fixed-padded'))}"
            + (f" MFU {m_pad:.1%}" if m_pad is not None else "")
        )
        rows.append(
            Row(
                judged(m is not None and m >= TARGET_MFU),
                "perf",
                f"MFU at batch {big}, {fixed_len}-token rows (6*N*T, peak {peak or 'n/a'} TFLOPS)",
                figure,
                f">= {TARGET_MFU:.0%}" + note,
            )
        )
    # (c) long-tailed rows: computed tokens and samples/s against the padded one-chunk step
    tokens, long_padded = ran("long-tokens"), ran("long-padded")
    if tokens and long_padded:
        speedup = tokens["samples_per_s"] / long_padded["samples_per_s"]
        rows.append(
            Row(
                judged(tokens["padded_ratio"] <= TARGET_PADDING),
                "perf",
                f"long-tailed rows, batch {big}: computed / real tokens with token chunks",
                f"{tokens['padded_ratio']:.3f}x ({long_padded['padded_ratio']:.2f}x padded to the batch max)",
                f"<= {TARGET_PADDING}x" + note,
            )
        )
        rows.append(
            Row(
                judged(speedup >= TARGET_LONG_SPEEDUP),
                "perf",
                f"long-tailed rows, batch {big}: token chunks vs the padded one-chunk step (both eager)",
                f"{speedup:.2f}x ({tokens['samples_per_s']:,.0f} vs {long_padded['samples_per_s']:,.0f} samples/s)",
                f">= {TARGET_LONG_SPEEDUP}x" + note,
            )
        )
    compiled = ran("long-tokens-compiled")
    if tokens and compiled:
        rows.append(
            Row(
                "INFO",
                "perf",
                "switch compile on long-tailed rows (changing chunk widths)",
                f"{compiled['samples_per_s'] / tokens['samples_per_s']:.2f}x eager",
            )
        )
    unpadded = ran("long-unpadded")
    if tokens and unpadded:
        rows.append(
            Row(
                "INFO",
                "perf",
                f"model.unpadded (varlen) on long-tailed rows, batch {big}: vs token chunks, both eager",
                f"{unpadded['samples_per_s'] / tokens['samples_per_s']:.2f}x "
                f"({unpadded['samples_per_s']:,.0f} vs {tokens['samples_per_s']:,.0f} samples/s)",
            )
        )
    for name, what in (
        ("fixed-no-compile", "torch.compile on / off"),
        ("fixed-no-fused", "fused AdamW on / off"),
        ("fixed-no-keep", "kept graphs on / off (off: gradient caching's re-forward)"),
    ):
        off = ran(name)
        if default and off:
            rows.append(
                Row(
                    "INFO",
                    "perf",
                    f"switch {what}, batch {big}",
                    f"{default['samples_per_s'] / off['samples_per_s']:.2f}x "
                    f"({default['samples_per_s']:,.0f} vs {off['samples_per_s']:,.0f} samples/s)",
                )
            )

    # (d) sentence-transformers on the same model, batch and rows
    for batch, mine_name, bh_name, cm_name in (
        (small, "small-default", "st-batch-hard-small", "st-cached-mnrl-small"),
        (big, "fixed-default", "st-batch-hard-big", "st-cached-mnrl-big"),
    ):
        mine = ran(mine_name)
        bh, cm = got.get(bh_name), got.get(cm_name)
        if mine is None or bh is None:
            continue
        figure = f"tripletctl {describe(mine)}; BatchHardTripletLoss {describe(bh)}; CachedMNRL {describe(cm)}"
        if batch == small:
            ok = "step_s" in bh and mine["samples_per_s"] >= TARGET_VS_ST * bh["samples_per_s"]
            ratio = f" = {mine['samples_per_s'] / bh['samples_per_s']:.2f}x" if "step_s" in bh else ""
            rows.append(
                Row(
                    judged(ok),
                    "st",
                    f"batch {batch}, {fixed_len}-token rows: tripletctl vs BatchHardTripletLoss{ratio}",
                    figure,
                    f">= {TARGET_VS_ST}x" + note,
                )
            )
        else:
            rows.append(
                Row(
                    judged(True),
                    "st",
                    f"batch {batch}, {fixed_len}-token rows: tripletctl runs (ST's plain loss: {describe(bh)})",
                    figure,
                    "runs" + note,
                )
            )
        if not ("step_s" in bh or bh.get("oom")) or (cm is not None and not ("step_s" in cm or cm.get("oom"))):
            rows.append(Row("FAIL", "st", f"batch {batch}: a sentence-transformers step did not run", figure))


# ------------------------------------------------------------------------------- the table


def print_table(rows: list[Row], header: str) -> str:
    width = min(CHECK_WIDTH, max(len(r.check) for r in rows))

    def cut(text: str, limit: int) -> str:
        return text if len(text) <= limit else text[: limit - 3] + "..."

    lines = [header, f"{'':4}  {'part':4}  {'check':{width}}  figure  [target]"]
    for r in rows:
        target = f"  [{r.target}]" if r.target else ""
        lines.append(f"{r.verdict:4}  {r.section:4}  {cut(r.check, width):{width}}  {cut(r.figure, 150)}{target}")
    counts = {v: sum(r.verdict == v for r in rows) for v in ("PASS", "FAIL", "SKIP", "INFO")}
    lines.append(
        " ".join(f"{n} {v}" for v, n in counts.items()) + f"   overall: {'FAIL' if counts['FAIL'] else 'PASS'}"
    )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (what the test suite runs)")
    p.add_argument("--sections", default="cuda,e2e,perf", help="comma-separated, of cuda, e2e, perf (perf holds st)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default 460 s, --smoke 420 s)")
    p.add_argument("--out", default=None, help="where the table and figures go (default $OUT, else /tmp/gpu_check)")
    p.add_argument(
        "--e2e-compile", action="store_true", help="the end-to-end run with train.compile: auto (the CUDA default)"
    )
    p.add_argument("--e2e-tiny", action="store_true", help="without --smoke: the GPU-sized e2e with the tiny BERT")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory (corpus, run, logs)")
    p.add_argument("--no-install", action="store_true", help="do not install the carried .whl/ wheels")
    p.add_argument("--st-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-configs", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.st_worker is not None:
        print(json.dumps(st_worker(json.loads(args.st_worker))))
        return 0
    if args.run_configs is not None:
        return run_configs_here(Path(args.run_configs))
    sizes = sizes_for(args.smoke, args.budget_s)
    if args.e2e_tiny:  # the GPU run's corpus, batches and steps with the tiny BERT: the e2e's data path on a CPU
        sizes = dataclasses.replace(sizes, bert=sizes_for(True, None).bert, lr=1e-3)
    if args.e2e_compile:
        sizes = dataclasses.replace(sizes, e2e_compile="auto")
    clock = Clock(sizes.budget_s)
    out = Path(args.out or os.environ.get("OUT") or "/tmp/gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check-work-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    install = not args.no_install and not args.smoke
    env = install_wheels(rows) if install else _plain_env()
    info = environment(rows, env)
    on_cuda = bool(info.get("cuda"))
    if not on_cuda and not args.smoke:
        rows.append(Row("FAIL", "env", "a CUDA device", "none found: run with --smoke on a CPU"))
    sections = set(args.sections.split(","))
    named = step_configs(sizes, on_cuda, work) if "perf" in sections else []
    got: dict[str, dict] = {}
    e2e_reserve = (sizes.e2e_reserve_s if "e2e" in sections else 0) + 10

    def steps(extra: bool, reserve_s: float) -> None:
        part = [(n, c) for n, c in named if bool(c.get("extra")) == extra]
        measure_named(part, env, clock, on_cuda, work, reserve_s, got)

    # What matters most first: the tests, the core figures, the end-to-end run, then the switches.
    for name, label, run in (
        ("cuda", "cuda", lambda: cuda_tests(rows, sizes, env, work, clock, on_cuda)),
        ("perf", "perf (core)", lambda: steps(extra=False, reserve_s=e2e_reserve)),
        ("e2e", "e2e", lambda: end_to_end(rows, sizes, env, work, clock)),
        ("perf", "perf (switches)", lambda: steps(extra=True, reserve_s=0)),
        ("perf", "perf rows", lambda: performance(rows, sizes, named, got, info)),
    ):
        if name not in sections:
            continue
        if clock.left() < 30 and label != "perf rows":
            rows.append(Row("SKIP", name, f"{label}: the whole section", f"time budget ({clock.left():.0f} s left)"))
            continue
        started = time.monotonic()
        try:
            run()
        except Exception as e:  # a bug in this script: say so in the table, keep the other sections
            rows.append(Row("FAIL", name, f"{label}: the section raised", f"{type(e).__name__}: {one_line(str(e))}"))
        print(f"[gpu_check] {label} done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: ("env", "cuda", "e2e", "perf", "st").index(r.section))
    header = (
        f"tripletctl GPU check{' --smoke' if args.smoke else ''}   {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f"   device {info.get('device')}   torch {info.get('torch')}   transformers {info.get('transformers')}"
        f"   sentence-transformers {info.get('sentence-transformers')}   {clock.elapsed():.0f} s"
    )
    table = print_table(rows, header)
    (out / "gpu_check.txt").write_text(table + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=1))
    for name in ("steps.json", "cuda-tests.log", "e2e/collapse.png"):  # at most 8 files come back from $OUT
        if (work / name).exists():
            shutil.copy(work / name, out / Path(name).name)
    logs = sorted((work / "e2e").glob("*.log"), key=lambda p: p.stat().st_mtime) if (work / "e2e").exists() else []
    (out / "e2e-logs.txt").write_text("".join(f"===== {p.name}\n{p.read_text(errors='replace')}\n" for p in logs))
    if args.keep_work:
        print(f"work directory kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r.verdict == "FAIL" for r in rows) else 0


def _plain_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


if __name__ == "__main__":
    sys.exit(main())
