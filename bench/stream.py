"""Can the data path feed the trainer, and does its memory stay flat as the corpus grows?

Writes a synthetic jsonl corpus of --gb gigabytes, streams one pass of it through tripletctl.data.stream
(shuffle buffer, class-balanced batching, tokenisation workers), and prints rows/s and RSS (main
process + tokenizer workers) after each quarter; then the encoder's training samples/s at the same
batch size on the same machine. RSS of the last report / first report must stay within 10%.

    python bench/stream.py --gb 1 --out-dir /tmp/tripletctl-bench
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TINY_BERT = REPO / "curricula" / "quickstart" / "tiny-bert"


def write_corpus(path: Path, gigabytes: float, classes: int, seed: int) -> int:
    """Lines of 10-40 words from a small vocabulary, labels uniform over `classes`; returns rows."""
    rng = random.Random(seed)
    words = [line.strip() for line in (TINY_BERT / "vocab.txt").open() if line.strip().isalpha()][:2000]
    pool = [" ".join(rng.choice(words) for _ in range(rng.randint(10, 40))) for _ in range(5000)]
    target, written, rows = int(gigabytes * 1e9), 0, 0
    with path.open("w", encoding="utf-8") as out:
        while written < target:
            lines = [
                f'{{"text": "{rng.choice(pool)} {i}", "label": "c{rng.randrange(classes)}"}}\n'
                for i in range(rows, rows + 10_000)
            ]
            chunk = "".join(lines)
            out.write(chunk)
            written += len(chunk)
            rows += len(lines)
    return rows


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child] + _descendants(child)
    return found


def current_rss_mb() -> float:
    pid = os.getpid()
    return sum(_rss_kb(p) for p in [pid] + _descendants(pid)) / 1024


def peak_rss_mb() -> tuple[float, float]:
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    )


def trainer_samples_per_s(tokenizer: str, batch, steps: int = 3) -> float:
    """Forward + backward + optimiser step of the encoder with batch-hard mining, on this machine."""
    import torch

    from tripletctl.config.blocks import ModelConfig
    from tripletctl.model.encoder import build_model

    model, _ = build_model(ModelConfig(name=tokenizer, init="config", head=(64,)), seed=0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    try:
        from tripletctl.train.mining import mine

        def loss_of(emb, labels):
            return mine(emb, labels, "batch-hard", 0.2)[0]
    except ImportError:

        def loss_of(emb, labels):
            d = torch.cdist(emb, emb)
            same = labels[:, None] == labels[None, :]
            return torch.relu((d * same).max(1).values - (d + same * 1e9).min(1).values + 0.2).mean()

    def step() -> None:
        loss = loss_of(model(batch.input_ids, batch.attention_mask), batch.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch.input_ids.shape[0] / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--out-dir", default=None, help="where the corpus goes (default: a temp dir)")
    parser.add_argument("--tokenizer", default=str(TINY_BERT))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--samples-per-class", type=int, default=4)
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--shuffle-buffer", type=int, default=10_000)
    parser.add_argument("--max-buffered-rows", type=int, default=200_000)
    parser.add_argument("--keep", action="store_true", help="keep the corpus afterwards")
    args = parser.parse_args()

    from tripletctl.config.blocks import DataConfig
    from tripletctl.data.stream import BatchStream

    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="tripletctl-bench-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.jsonl"
    started = time.perf_counter()
    total_rows = write_corpus(corpus, args.gb, args.classes, seed=0)
    print(
        f"wrote {corpus} ({corpus.stat().st_size / 1e9:.2f} GB, {total_rows:,} rows, {args.classes:,} classes) "
        f"in {time.perf_counter() - started:.0f} s"
    )

    data = DataConfig(
        source=str(corpus),
        shuffle_buffer=args.shuffle_buffer,
        max_length=args.max_length,
        samples_per_class=args.samples_per_class,
        max_buffered_rows=args.max_buffered_rows,
        tokenizer_workers=args.workers,
        prefetch_batches=2,
    )
    reports = 4 if args.gb < 4 else int(args.gb)
    marks = [total_rows * (i + 1) // reports for i in range(reports)]
    rss: list[float] = []
    stream = BatchStream(data, args.tokenizer, args.batch_size, seed=0)
    first_batch = None
    try:
        started = time.perf_counter()
        rows_out = 0
        for batch in stream:
            first_batch = first_batch or batch
            rows_out += batch.input_ids.shape[0]
            while marks and batch.rows_seen >= marks[0]:
                marks.pop(0)
                elapsed = time.perf_counter() - started
                rss.append(current_rss_mb())
                peak_self, peak_children = peak_rss_mb()
                print(
                    f"{batch.rows_seen / total_rows * args.gb:5.2f} GB read: {batch.rows_seen / elapsed:9,.0f} rows/s "
                    f"read, {rows_out / elapsed:9,.0f} rows/s batched+tokenised | RSS now {rss[-1]:7.0f} MB "
                    f"(main+workers), peak main {peak_self:.0f} MB, peak worker {peak_children:.0f} MB | "
                    f"evicted {batch.classes_evicted:,} classes",
                    flush=True,
                )
            if not marks:
                break
        data_rate = rows_out / (time.perf_counter() - started)
    finally:
        stream.close()
        if not args.keep:
            shutil.rmtree(out_dir) if args.out_dir is None else corpus.unlink()

    ratio = rss[-1] / rss[0]
    train_rate = trainer_samples_per_s(args.tokenizer, first_batch)
    print(
        f"data path: {data_rate:,.0f} rows/s with {args.workers} tokenizer worker(s); "
        f"trainer: {train_rate:,.0f} samples/s (batch {args.batch_size}, batch-hard, same machine) -> "
        f"{'data path is faster' if data_rate > train_rate else 'DATA PATH IS THE BOTTLENECK'} "
        f"({data_rate / train_rate:.1f}x)"
    )
    verdict = "PASS" if ratio <= 1.10 else "FAIL"
    print(f"RSS last/first = {rss[-1]:.0f}/{rss[0]:.0f} MB = {ratio:.3f} -> {verdict} (flat within 10%)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
