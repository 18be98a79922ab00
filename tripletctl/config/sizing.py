"""How big a run should be for the data it has: `tripletctl init`'s sizing rule (`size_run`), which
classes a batch needs (`batch_fill`, also what `validate` checks against the rows it reads), and how
much of the data to hold out (`hold_out`).

Pure: counts in, numbers out, no torch and no files, so the rule can be tuned in this one place and
tested on plain lists (tests/test_sizing.py). docs/init.md explains it; the numbers come from the
probe quoted in issue 36 and from curricula/facenet.yaml (bench/quality.py).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

REUSE_FACTOR = 2  # data/batching.py's: few ready classes make a batch once they hold 2 batches of rows
FEW_CLASSES = 8  # up to this many classes, every batch holds every class (the growth schedule)
CAPS = {"cpu": (64, 256), "cuda": (512, 2048)}  # device: (first batch, largest batch), texts
SHARES_FEW = (0.2, 0.4, 0.4)  # of the budget: semi-hard small (a maximum: `until` ends it), semi-hard, hard
SHARES_MANY = (0.3, 0.7)  # semi-hard (a maximum), InfoNCE: facenet.yaml's shape
MIN_STEPS = 3  # a phase shorter than this says nothing
MINED_PER_CLASS = 2  # labelled rows, InfoNCE phase: negatives each class brings (bench/quality.py tc-facenet-mined)
MINED_CLASS_RATIO = 20  # ... when the corpus has this many times the classes of a batch (docs/init.md)
ACTIVE_BELOW = 0.3  # semi-hard has little left to teach once fewer triplets than this are active
BASE_LR = 2e-5  # at the first phase's batch, scaled by sqrt(batch / first): facenet.yaml's anchor
SMALL_MODEL_LR = 1e-4  # hidden size below 384 (BERT miniatures fine-tune at 1e-4 to 3e-4)
FROM_SCRATCH_LR = 1e-3  # init: config, random weights (the quickstart's)
HOLD_OUT_SHARE = 0.2  # of the classes (many) or of each class's rows (few)
HOLD_OUT_MAX_ROWS = 2000  # held-out rows kept at most (retrieval costs the square)
HOLD_OUT_MIN_CLASSES = 10  # below this, whole-class hold-out leaves too few classes on either side
OVER_TRAIN_PASSES = 4  # above this many passes over its texts a run can over-train: only then a block pays


# ----------------------------------------------------------------------------- what a batch needs


@dataclass(frozen=True)
class DataFacts:
    """What reading a source found: data/header.py (`validate`, `train`) and data/survey.py (`init`)."""

    label: str  # how messages name the source
    columns: tuple[str, ...] = ()
    rows_read: int = 0
    usable_rows: int = 0
    complete: bool = False  # the whole source was read: the counts are exact, not lower bounds
    class_rows: tuple[int, ...] | None = None  # distinct usable texts per class (labelled layout)
    problems: tuple[str, ...] = ()  # wrong columns, no usable row: each one line
    note: str | None = None  # why it was not checked, or not all of it


def _floor_to(value: int, multiple: int) -> int:
    return value // multiple * multiple


def largest_fillable(class_rows: Sequence[int], samples_per_class: int) -> int:
    """The largest batch (a multiple of samples_per_class) these classes can make: distinct classes
    (samples_per_class rows of each), or every class reused once they hold REUSE_FACTOR batches."""
    ready = [n for n in class_rows if n >= samples_per_class]
    if len(ready) < 2:
        return 0
    return _floor_to(max(samples_per_class * len(ready), sum(ready) // REUSE_FACTOR), samples_per_class)


def batch_fill(class_rows: Sequence[int], batch_size: int, samples_per_class: int) -> tuple[str, str]:
    """How a labelled batch of `batch_size` rows fills from classes of these sizes (docs/data.md,
    "Batch composition"): ("distinct", ...) with `slots` different classes, ("reuse", ...) with every
    class in every batch, or ("never", why): the batcher would wait for rows that do not exist."""
    spc = samples_per_class
    ready = [n for n in class_rows if n >= spc]
    slots = batch_size // spc
    if len(ready) >= slots:
        return "distinct", f"{slots} classes × {spc} rows"
    if len(ready) >= 2 and sum(ready) >= REUSE_FACTOR * batch_size:
        return "reuse", f"all {len(ready)} classes in every batch, about {batch_size // len(ready)} rows each"
    have = f"{len(ready)} class{'' if len(ready) == 1 else 'es'} with at least {spc} distinct rows"
    if len(ready) < 2:
        return "never", f"it has {have}; a batch needs 2"
    return "never", (
        f"it has {have} ({slots} needed for {slots} × {spc}), and reusing them needs "
        f"{REUSE_FACTOR * batch_size:,} distinct rows, it has {sum(ready):,}; at most "
        f"{largest_fillable(class_rows, spc):,} fits"
    )


# ----------------------------------------------------------------------------- hold-out


@dataclass(frozen=True)
class HoldOut:
    """What to keep out of training: whole classes (`labels`), or `rows` rows of every class."""

    mode: str  # "classes" | "rows"
    labels: frozenset = frozenset()  # mode classes
    rows: Mapping[Hashable, int] | None = None  # mode rows: rows held out per class

    def describe(self, classes: int) -> str:
        if self.mode == "classes":
            return f"{len(self.labels)} whole classes of {classes} held out (never seen in training)"
        held = sum((self.rows or {}).values())
        return (
            f"{held:,} rows held out across all {classes} classes: with {classes} classes whole-class "
            f"hold-out is impossible, so held-out rows share their classes with training"
        )


def holds_out(budget: int | None, texts: int, device: str) -> bool:
    """Whether `init` keeps a held-out block out of a complete source's training rows: only where the
    run passes over its texts more than OVER_TRAIN_PASSES times. A block's rows and classes are lost to
    training, and it pays only by choosing the best model of a run that over-trains: on debtags (44
    passes) the best held-out model tied sentence-transformers' MNRL where the last one trailed by 2.3
    points of MAP@R; on debsource (3.1 passes) the best was the last within ±0.003, and the block cost
    0.3 points of recall@1 (docs/init.md)."""
    return passes(budget, texts, device) > OVER_TRAIN_PASSES


def passes(budget: int | None, texts: int, device: str) -> float:
    """Passes a budget (None: `default_budget`'s) makes over these texts."""
    return (budget or default_budget(texts, device)) / texts


def hold_out(class_rows: Mapping[Hashable, int], seed: int = 0) -> HoldOut:
    """Whole classes when there are enough of them (`HOLD_OUT_MIN_CLASSES`), chosen at random (seeded);
    else a share of every class's rows, at least 2 (a held-out query needs a same-class row) and never
    so many that fewer than 2 stay in training. Held-out rows are capped at HOLD_OUT_MAX_ROWS."""
    usable = {label: n for label, n in class_rows.items() if n >= 2}
    ordered = sorted(usable, key=repr)
    if len(usable) >= HOLD_OUT_MIN_CLASSES:
        chosen: list = []
        rows = 0
        for label in random.Random(seed).sample(ordered, len(ordered)):
            if len(chosen) >= max(2, round(HOLD_OUT_SHARE * len(usable))) or rows >= HOLD_OUT_MAX_ROWS:
                break
            chosen.append(label)
            rows += usable[label]
        return HoldOut("classes", labels=frozenset(chosen))
    cap = max(2, HOLD_OUT_MAX_ROWS // max(len(usable), 1))
    rows_of = {label: min(cap, max(2, round(HOLD_OUT_SHARE * n))) for label, n in usable.items() if n >= 4}
    return HoldOut("rows", rows=rows_of)


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class PhasePlan:
    name: str
    mining: str
    batch_size: int
    steps: int
    margin: float
    warmup_steps: int
    loss: str = "margin"
    until: dict | None = None
    mined_negatives: dict | None = None
    why: str = ""  # the comment `init` writes above the phase


@dataclass(frozen=True)
class Sizing:
    regime: str  # "few" (growth schedule) | "many" (facenet.yaml's shape)
    samples_per_class: int
    phases: tuple[PhasePlan, ...]
    lr_reference_batch: int  # the first phase's batch: lr is meant for it, scaled by sqrt
    checkpoint_every: int
    eval_every: int
    shuffle_buffer: int
    tokenizer_workers: int
    why: str  # one line: which rule and why

    @property
    def samples(self) -> int:
        return sum(p.batch_size * p.steps for p in self.phases)


def nice(value: float) -> int:
    """The largest 1, 2 or 5 × 10^k at most `value` (at least 1): intervals a reader can add up."""
    if value < 1:
        return 1
    power = 10 ** int(math.floor(math.log10(value)))
    return max(m * power for m in (1, 2, 5) if m * power <= value)


def eval_stop() -> dict:
    """The last phase's `until` (many classes): held-out MAP@R flat for 2 evals; a new dict each call."""
    return {"eval_plateau": {"metric": "map@r", "patience": 2}}


def held_out_every(total_steps: int) -> int:
    """Held-out evals about 10 a run; 0 (phase ends only) below 100 steps."""
    return nice(total_steps / 10) if total_steps >= 100 else 0


def stops_on_eval(last_phase_steps: int, eval_every: int) -> bool:
    """eval_stop() only where the last phase holds 4 evals or more: fewer cannot show a plateau."""
    return bool(eval_every) and last_phase_steps >= 4 * eval_every


def default_budget(train_rows: int, device: str) -> int:
    """Without --budget: four passes over the training rows, within [2,000, 200,000] on a CPU
    ([2,000, 2,000,000] on a GPU)."""
    return min(max(4 * train_rows, 2000), 200_000 if device == "cpu" else 2_000_000)


def learning_rate(hidden_size: int | None, from_scratch: bool) -> float:
    """The peak rate at the first phase's batch: BERT-sized pretrained encoders fine-tune at 2e-5
    (facenet.yaml; the probe of issue 36), small ones higher, random weights much higher."""
    if from_scratch:
        return FROM_SCRATCH_LR
    if hidden_size is not None and hidden_size < 384:
        return SMALL_MODEL_LR
    return BASE_LR


def _steps(share: float, budget: int, batch: int) -> int:
    return max(MIN_STEPS, round(share * budget / batch))


def _warmup(steps: int) -> int:
    return max(1, min(100, steps // 10))


def _window(steps: int) -> int:
    return max(5, min(50, steps // 10))


def _few(class_rows: Sequence[int], budget: int, device: str) -> tuple[int, list[PhasePlan], str]:
    """Two to FEW_CLASSES classes: every batch holds every class (reused, docs/data.md), so the batch
    sets only how many updates a budget buys. Small semi-hard batches while triplets are informative,
    until fewer than 30% are active; then 4× the batch, then 16× it, semi-hard throughout: with two
    classes, hard-negative mining last lost held-out MAP@R (bench/two_class.py, docs/init.md)."""
    spc = 2
    capacity = largest_fillable(class_rows, spc)
    _, largest = CAPS[device]
    first = min(max(12, _floor_to(4 * len(class_rows), spc)), capacity)
    batches = (first, min(4 * first, largest, capacity), min(16 * first, largest, capacity))
    batches = tuple(max(b, first) for b in batches)
    steps = [_steps(share, budget, b) for share, b in zip(SHARES_FEW, batches)]
    phases = [
        PhasePlan(
            "semi-hard-small",
            "semi-hard",
            batches[0],
            steps[0],
            0.5,
            _warmup(steps[0]),
            until={"active_fraction_below": ACTIVE_BELOW, "window": _window(steps[0])},
            why="many small updates while most triplets still teach; ends once fewer than 30% are active",
        ),
        PhasePlan(
            "semi-hard",
            "semi-hard",
            batches[1],
            steps[1],
            0.5,
            _warmup(steps[1]),
            why=f"{batches[1] // batches[0]}× the batch once triplets turn easy: more candidates per anchor",
        ),
        PhasePlan(
            "semi-hard-large",
            "semi-hard",
            batches[2],
            steps[2],
            0.5,
            _warmup(steps[2]),
            why="the largest batch last, still semi-hard: with few broad classes the hardest negatives are "
            "ambiguous rows (hard-negative here lost held-out MAP@R, docs/init.md)",
        ),
    ]
    why = (
        f"{len(class_rows)} classes (at most {FEW_CLASSES}): every batch holds every class, so batches "
        f"grow {batches[0]} → {batches[1]} → {batches[2]} as triplets turn easy (issue 36's probe)"
    )
    return spc, phases, why


def samples_per_class_for(class_rows: Sequence[int]) -> int:
    """4 rows a class, fewer when a quarter of the classes hold fewer: a class of 2 or 3 rows never
    fills a slot of 4 (on debsource, three quarters of its 5,904 classes)."""
    ordered = sorted(class_rows)
    return max(2, min(4, ordered[len(ordered) // 4]))


def mines_negatives(classes: int, batch: int, samples_per_class: int) -> bool:
    """Whether an InfoNCE batch of `batch` labelled rows brings mined negatives: where it holds at most a
    MINED_CLASS_RATIO-th of the classes, a random batch rarely holds a class's confusers."""
    return classes >= MINED_CLASS_RATIO * (batch // (samples_per_class + MINED_PER_CLASS))


def _many(class_rows: Sequence[int], budget: int, device: str, group: int | None) -> tuple[int, list[PhasePlan], str]:
    """More classes than a small batch holds: facenet.yaml's shape, semi-hard (margin 0.5) until it runs
    out of work, then InfoNCE over a batch up to 4× larger, batches of distinct classes only.
    `group`: the texts of one row for pairs (2) and triplets (2 + negatives), None for labelled rows."""
    if group is None:
        spc = samples_per_class_for(class_rows)
        capacity = _floor_to(spc * sum(1 for n in class_rows if n >= spc), spc)
    else:
        spc, capacity = group, group * len(class_rows)
    small, largest = CAPS[device]
    first = max(2 * spc, _floor_to(min(small, capacity), spc))
    second = max(first, _floor_to(min(4 * first, largest, capacity), spc))
    # labelled rows whose random batches hold few of the classes (a class rarely meets its confusers):
    # each class of the InfoNCE batch brings mined negatives, which the batcher does not draw
    mined = None
    if group is None and mines_negatives(len(class_rows), second, spc):
        mined = {"per_class": MINED_PER_CLASS}
        second = max(2 * (spc + MINED_PER_CLASS), _floor_to(second, spc + MINED_PER_CLASS))
    steps = [_steps(share, budget, b) for share, b in zip(SHARES_MANY, (first, second))]
    phases = [
        PhasePlan(
            "semi-hard",
            "semi-hard",
            first,
            steps[0],
            0.5,
            _warmup(steps[0]),
            until={
                "active_fraction_below": ACTIVE_BELOW,
                # a plateau needs a phase long enough to show one
                **(
                    {"plateau": {"metric": "batch_hard_loss", "patience": steps[0] // 5, "min_delta": 0.01}}
                    if steps[0] >= 100
                    else {}
                ),
                "window": _window(steps[0]),
            },
            why="semi-hard first (FaceNet's guard against early collapse), until it runs out of work",
        ),
        PhasePlan(
            "infonce",
            "batch-all",
            second,
            steps[1],
            0.2,
            _warmup(steps[1]),
            loss="infonce",
            mined_negatives=mined,
            why="then supervised InfoNCE over the whole batch (facenet.yaml, set on bench/quality.py)"
            + (f", each class with {MINED_PER_CLASS} negatives mined from the corpus as it starts" if mined else ""),
        ),
    ]
    classes = f"{len(class_rows):,} {'classes' if group is None else 'rows, each its own class'}"
    why = f"{classes}: facenet.yaml's shape, batches of distinct classes ({first} → {second})"
    return spc, phases, why


def size_run(
    class_rows: Sequence[int], budget: int, device: str, group: int | None = None, has_eval: bool = True
) -> Sizing:
    """THE rule: the phases, batch sizes and steps (from the `budget` in samples: texts embedded in
    training batches), checkpoint and eval intervals for classes of these sizes (distinct usable
    rows per class; pairs and triplets: one entry per row, `group` texts each) on `device` ("cpu" or
    "cuda"). Raises ValueError when fewer than 2 classes can make a batch."""
    if device not in CAPS:
        raise ValueError(f"device must be one of {', '.join(CAPS)}, got {device!r}")
    if budget < 1:
        raise ValueError(f"the budget must be a positive number of samples, got {budget}")
    rows = [n for n in class_rows if n >= 2] if group is None else list(class_rows)
    if len(rows) < 2:
        raise ValueError(f"training needs at least 2 classes with 2 or more distinct rows, the data has {len(rows)}")
    if group is None and len(rows) <= FEW_CLASSES:
        spc, phases, why = _few(rows, budget, device)
        regime = "few"
    else:
        spc, phases, why = _many(rows, budget, device, group)
        regime = "many"
    total_steps = sum(p.steps for p in phases)
    eval_every = held_out_every(total_steps) if has_eval else 0
    if regime == "many" and stops_on_eval(phases[-1].steps, eval_every):
        phases[-1] = dataclasses.replace(phases[-1], until=eval_stop())
    return Sizing(
        regime=regime,
        samples_per_class=spc,
        phases=tuple(phases),
        lr_reference_batch=phases[0].batch_size,
        checkpoint_every=nice(total_steps / 10) if total_steps > 200 else 0,
        eval_every=eval_every,
        shuffle_buffer=max(100, min(10_000, sum(rows) * (1 if group is None else group))),
        tokenizer_workers=1 if device == "cpu" else (4 if phases[-1].batch_size >= 512 else 2),
        why=why,
    )


def max_length_for(word_counts: Sequence[int], limit: int | None) -> int:
    """Tokens per text: the 95th percentile of the sampled texts' words × 1.4 (WordPiece splits the
    rarer words), rounded up to a power of two in [32, 256], never above the model's `limit`."""
    ordered = sorted(word_counts)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else 128
    length = 32
    while length < 256 and length < 1.4 * p95:
        length *= 2
    return min(length, limit) if limit else length
