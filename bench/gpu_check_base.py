"""What every part of the GPU check (bench/gpu_check.py) shares: the sizes of a GPU run and of
--smoke, a table row, the time budget, and running a command with its output logged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
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
