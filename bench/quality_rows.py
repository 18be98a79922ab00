"""bench/quality.py's rows: what each tripletctl row trains (a curriculum shape and its keys) and which
sentence-transformers loss each anchor row runs. quality.py writes the curricula and runs them; the rows
are here so that a new one is a few lines beside the others."""

from __future__ import annotations

from dataclasses import dataclass, field

REFERENCE_ROW = "tc-facenet"  # the shipped curriculum: every other tripletctl row is measured against it


@dataclass(frozen=True)
class Phase:
    mining: str
    share: float  # of the row's samples
    batch_factor: float = 1.0  # batch = factor x size.batch
    keys: dict = field(default_factory=dict)  # more phase keys, e.g. {"loss": "infonce"}


def _facenet_shape(semi_hard: dict, infonce: dict, train: dict, data: dict | None = None, semi_share: float = 0.5):
    """The shipped curricula/facenet.yaml's shape scaled to the budget (semi-hard with margin 0.5 at half
    the batch, then InfoNCE at twice it), with some keys changed: a lever's row is this shape with its
    keys, so that its difference to `tc-facenet` is the lever's."""
    phases = [
        Phase("semi-hard", semi_share, 0.5, {"margin": 0.5, **semi_hard}),
        Phase("batch-all", 1.0 - semi_share, 2.0, {"loss": "infonce", **infonce}),
    ]
    return phases, {
        "train": {"distance": "squared-euclidean", "lr_scaling": "sqrt", **train},
        **({"data": data} if data else {}),
    }


# tripletctl rows: phases (samples split by share) and top-level overrides; tests/test_quality_bench.py
# validates every one at every size
TRIPLETCTL_ROWS: dict[str, tuple[list[Phase], dict]] = {
    "tc-facenet": _facenet_shape({}, {}, {}),  # the shipped curricula/facenet.yaml, scaled to the budget
    # its InfoNCE phase on neighbour classes (issue 32), guarded: centroids fed from the semi-hard phase
    "tc-facenet-nb": _facenet_shape(
        {}, {"batch_classes": "neighbours", "false_negative_guard": 0.95}, {}, data={"neighbour_refresh": 5}
    ),
    # its InfoNCE phase with hardness-weighted negatives (issue 32, item 5): α 2, sentence-transformers'
    # recommended value at its scale 20 (our τ 0.05)
    "tc-facenet-hw": _facenet_shape({}, {"hardness_alpha": 2.0}, {}),
    # its InfoNCE phase with negatives mined from the corpus when it starts (issue 32, item 5's first
    # lever): each class brings the 2 rows of other classes the model then puts closest, below 0.95 x
    # the class's own similarity; the pool covers the training file (20,612 rows on debsource)
    "tc-facenet-mined": _facenet_shape({}, {"mined_negatives": {"per_class": 2, "pool_rows": 21000}}, {}),
    # `tripletctl init`'s shape for labelled data with many classes (semi-hard for about a quarter of the
    # budget, InfoNCE for the rest, sizing.SHARES_MANY = 0.3 / 0.7), without and with the mined lever that
    # init turns on where a batch holds at most a twentieth of the classes (issue 32). The screens that
    # did not beat tc-facenet-mined-long (4 mined a class, hardness α 2 on top, mined in both phases,
    # re-mined halfway, InfoNCE for 9/10 or alone, a 4x InfoNCE batch) are in git: `git show e007390:bench/quality.py`
    "tc-facenet-long": _facenet_shape({}, {}, {}, semi_share=0.25),
    "tc-facenet-mined-long": _facenet_shape(
        {}, {"mined_negatives": {"per_class": 2, "pool_rows": 21000}}, {}, semi_share=0.25
    ),
    # -long with the lever at 2 rows a class, what `tripletctl init` writes for debsource (a quarter of its
    # classes hold fewer than 4 rows: at 4 a class, 4,454 of its 5,904 classes never fill a batch slot)
    "tc-facenet-mined-long-spc2": _facenet_shape(
        {},
        {"mined_negatives": {"per_class": 2, "pool_rows": 21000}},
        {},
        data={"samples_per_class": 2},
        semi_share=0.25,
    ),
    # its two losses alone, each for the whole budget
    "tc-semi-hard": ([Phase("semi-hard", 1.0)], {}),
    "tc-infonce": ([Phase("batch-all", 1.0, keys={"loss": "infonce"})], {}),
}
# rows that run with the held-out block `tripletctl init` writes: a fifth of the *training* classes (never the
# scored ones) kept out of training and evaluated every nice(steps / 10), and the last phase ending once
# held-out MAP@R is flat for 2 evals, where init's rule puts that stop (config/sizing.py `size_run`): a
# corpus of 1,439 rows at 64,000 samples is 44 passes, and this is init's answer to over-training
STOP_ROWS = {
    "tc-facenet-long-stop": "tc-facenet-long",
    "tc-facenet-mined-long-spc2-stop": "tc-facenet-mined-long-spc2",
    "tc-facenet-long-best": "tc-facenet-long",
    "tc-facenet-mined-long-spc2-best": "tc-facenet-mined-long-spc2",
}
TRIPLETCTL_ROWS.update({row: TRIPLETCTL_ROWS[base] for row, base in STOP_ROWS.items()})
# -best: also `train.keep_best: map@r` (as init writes it now), and the model scored is OUTPUT/best:
# the eval block's best of the whole run, where the stop only ends the last phase on that phase's best
for _row in ("tc-facenet-long-best", "tc-facenet-mined-long-spc2-best"):
    _phases, _overrides = TRIPLETCTL_ROWS[_row]
    TRIPLETCTL_ROWS[_row] = (_phases, {**_overrides, "train": {**_overrides["train"], "keep_best": "map@r"}})
# what `tripletctl init` writes for the corpus and budget, by init's own rules (config/sizing.py): on
# tc-facenet-long's shape (the bench's batch and lr, as every row), a held-out block + keep_best only above
# OVER_TRAIN_PASSES passes (`holds_out`), rows a class (`samples_per_class_for`) and mined negatives
# (`mines_negatives`) from the classes left to train. pool_rows 21,000 as the mined rows above (init writes
# the default 20,000: 97% of debsource's 20,612 training rows). quality.py resolves it per corpus:
# debsource at 64,000 samples trains tc-facenet-mined-long-spc2, debtags tc-facenet-long-best.
INIT_ROW = "tc-init"


def init_shape(class_rows: list[int], batch: int, block: bool) -> tuple[list[Phase], dict]:
    """INIT_ROW's phases and overrides for training classes of these sizes at the bench's `batch`."""
    from tripletctl.config.sizing import MINED_PER_CLASS, mines_negatives, samples_per_class_for

    rows = [n for n in class_rows if n >= 2]  # size_run's: a class of one row trains nothing
    spc = samples_per_class_for(rows)
    infonce_batch = round(2 * batch / spc) * spc  # _facenet_shape's InfoNCE batch before mined rows join it
    mined = mines_negatives(len(rows), infonce_batch, spc)
    infonce = {"mined_negatives": {"per_class": MINED_PER_CLASS, "pool_rows": 21000}} if mined else {}
    train = {"keep_best": "map@r"} if block else {}
    return _facenet_shape({}, infonce, train, data={"samples_per_class": spc}, semi_share=0.25)


# a lever's row on a shape other than tc-facenet's, and that shape without it: the report compares them too
LEVER_BASE = {"tc-facenet-mined-long": "tc-facenet-long", **STOP_ROWS}
# sentence-transformers rows: the loss, with the library's own sampler for it
ST_ROWS = {
    "st-semi-hard": "BatchSemiHardTripletLoss",
    "st-batch-hard": "BatchHardTripletLoss",
    "st-mnrl": "MultipleNegativesRankingLoss",
}
ROWS = ["zero-shot", *ST_ROWS, REFERENCE_ROW]  # the default table; every other row runs by name
MORE_ROWS = [*(r for r in TRIPLETCTL_ROWS if r not in ROWS), INIT_ROW]
ALL_ROWS = [*ROWS, *MORE_ROWS]
