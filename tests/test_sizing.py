"""config/sizing.py: `init`'s sizing rule, what a batch asks of the classes (checked against the real
batcher), and the hold-out, on plain lists."""

from __future__ import annotations

import random

import pytest
from helpers import ListRows, labelled

from tripletctl.config import sizing
from tripletctl.config.mined_negatives import MinedNegativesConfig, stream_rows
from tripletctl.config.sizing import (
    batch_fill,
    hold_out,
    holds_out,
    largest_fillable,
    max_length_for,
    nice,
    size_run,
)
from tripletctl.data import batching
from tripletctl.data.batching import ClassBatcher, Shuffler


def test_the_reuse_factor_is_the_batchers():
    assert sizing.REUSE_FACTOR == batching.REUSE_FACTOR


class _Exhausted(Exception):
    pass


class _Bounded(ListRows):
    """ListRows that gives up after `epochs` passes: a batch that has not formed by then never will."""

    def __init__(self, rows: list[list], epochs: int):
        super().__init__(rows)
        self.limit = epochs * len(rows)

    def next_row(self) -> list:
        if self.position >= self.limit:
            raise _Exhausted
        return super().next_row()


def _batcher_fills(class_rows: list[int], batch: int, spc: int) -> bool:
    rows = [[f"c{c} r{r}", c] for c, n in enumerate(class_rows) for r in range(n)]
    random.Random(0).shuffle(rows)
    batcher = ClassBatcher(Shuffler(_Bounded(rows, 12), 8, seed=0), batch, spc, 100_000)
    try:
        for _ in range(3):
            batcher.next_batch()
    except (_Exhausted, batching.DataError):
        return False
    return True


@pytest.mark.parametrize("seed", range(40))
def test_batch_fill_says_never_exactly_when_the_batcher_cannot_make_batches(seed):
    rng = random.Random(seed)
    class_rows = [rng.randint(1, 40) for _ in range(rng.randint(1, 20))]
    spc = rng.choice([2, 3, 4])
    batch = spc * rng.randint(2, 16)
    kind, why = batch_fill(class_rows, batch, spc)
    assert (kind != "never") == _batcher_fills(class_rows, batch, spc), (class_rows, batch, spc, kind, why)
    if kind == "never" and largest_fillable(class_rows, spc):
        assert _batcher_fills(class_rows, largest_fillable(class_rows, spc), spc)


def test_batch_fill_names_what_is_missing():
    assert batch_fill([50] * 64, 256, 4) == ("distinct", "64 classes × 4 rows")
    kind, why = batch_fill([74] * 64, 2000, 4)  # the 64 classes under a 2000-row batch: reused
    assert kind == "reuse" and "all 64 classes" in why
    kind, why = batch_fill([30] * 64, 2000, 4)
    assert kind == "never" and "4,000 distinct rows, it has 1,920" in why and "at most 960 fits" in why
    assert batch_fill([100], 12, 2)[0] == "never"


def test_two_classes_grow_the_batch_as_the_probe_did():
    """Issue 36's probe: semi-hard at 12 until the active fraction fell below 0.3, then at 48; the
    last phase at 192 stays semi-hard (bench/two_class.py: hard-negative there lost MAP@R)."""
    plan = size_run([5000, 5000], budget=13_824, device="cpu")
    assert plan.regime == "few" and plan.samples_per_class == 2
    assert [(p.mining, p.batch_size) for p in plan.phases] == [
        ("semi-hard", 12),
        ("semi-hard", 48),
        ("semi-hard", 192),
    ]
    assert [p.margin for p in plan.phases] == [0.5, 0.5, 0.5]
    assert plan.phases[0].until["active_fraction_below"] == 0.3
    assert plan.phases[1].until is None and plan.phases[2].until is None
    assert abs(plan.samples - 13_824) / 13_824 < 0.02  # steps come from the budget
    assert [p.steps for p in plan.phases] == [230, 115, 29]
    assert plan.lr_reference_batch == 12


def test_small_data_caps_the_batches_at_what_reuse_can_fill():
    plan = size_run([160, 160], budget=2000, device="cpu")
    assert [p.batch_size for p in plan.phases] == [12, 48, 160]  # 320 rows fill batches of 160 at most
    for phase in plan.phases:
        assert batch_fill([160, 160], phase.batch_size, plan.samples_per_class)[0] != "never"


def test_many_classes_take_facenets_shape_sized_to_the_classes():
    plan = size_run([12] * 80, budget=3000, device="cpu")
    assert plan.regime == "many" and plan.samples_per_class == 4
    assert [(p.mining, p.loss, p.batch_size, p.mined_negatives) for p in plan.phases] == [
        ("semi-hard", "margin", 64, None),
        ("batch-all", "infonce", 256, None),  # 64 of 80 classes in a batch: they meet their confusers anyway
    ]
    for phase in plan.phases:  # batches of distinct classes only: 80 classes hold 320 rows of 4
        assert batch_fill([12] * 80, phase.batch_size, 4)[0] == "distinct"
    gpu = size_run([12] * 3000, budget=6_000_000, device="cuda")
    assert [p.batch_size for p in gpu.phases] == [512, 2048]
    few_classes = size_run([12] * 20, budget=3000, device="cuda")
    assert [p.batch_size for p in few_classes.phases] == [80, 80]  # 20 classes × 4 rows: never 500 / 2000


def test_mined_negatives_when_a_batch_holds_a_twentieth_of_the_classes_or_less():
    for classes, device, mined in [
        (839, "cpu", False),
        (840, "cpu", True),
        (6_820, "cuda", True),
        (6_000, "cuda", False),
    ]:
        plan = size_run([12] * classes, budget=3_000_000, device=device)
        infonce = plan.phases[1]
        assert (infonce.mined_negatives == {"per_class": 2}) is mined, (classes, device)
        if mined:  # 42 (cpu) or 341 (cuda) classes of 4 rows + 2 mined each
            assert infonce.batch_size == {"cpu": 252, "cuda": 2046}[device]
            config = MinedNegativesConfig(per_class=2)
            assert batch_fill([12] * classes, stream_rows(infonce.batch_size, 4, config), 4)[0] == "distinct"
    pairs = size_run([1] * 100_000, budget=6_000_000, device="cuda", group=2)
    assert [p.mined_negatives for p in pairs.phases] == [None, None]  # each row its own class: nothing to mine


def test_intervals_follow_the_run_length():
    short = size_run([160, 160], budget=2000, device="cpu")
    assert short.checkpoint_every == 0 and short.eval_every == 0
    long = size_run([12] * 3000, budget=2_000_000, device="cuda")
    total = sum(p.steps for p in long.phases)
    assert long.checkpoint_every == nice(total / 10) and 5 <= total / long.eval_every <= 20
    assert long.phases[-1].until == {"eval_plateau": {"metric": "map@r", "patience": 2}}
    assert all(1 <= p.warmup_steps <= min(100, max(1, p.steps // 10)) for p in long.phases)


def test_too_few_classes_is_an_error():
    with pytest.raises(ValueError, match="at least 2 classes"):
        size_run([100, 1], budget=1000, device="cpu")


def test_a_block_is_held_out_only_past_four_passes():
    assert not holds_out(4 * 20_612, 20_612, "cpu") and holds_out(4 * 20_612 + 1, 20_612, "cpu")
    assert not holds_out(None, 20_612, "cpu")  # the default budget is 4 passes
    assert holds_out(None, 300, "cpu")  # ... at least 2,000 samples: 6.7 passes over 300 texts
    assert not holds_out(None, 1_000_000, "cuda")  # ... at most 2,000,000: 2 passes
    assert holds_out(64_000, 1_439, "cpu") and not holds_out(64_000, 20_612, "cpu")  # the bench's debtags, debsource


def test_hold_out_takes_whole_classes_when_there_are_enough():
    counts = {f"k{i}": 12 for i in range(100)}
    plan = hold_out(counts)
    assert plan.mode == "classes" and len(plan.labels) == 20 and plan.labels <= set(counts)
    assert hold_out(counts) == plan and hold_out(counts, seed=1) != plan  # seeded


def test_hold_out_with_two_classes_takes_rows_of_every_class():
    plan = hold_out({"yes": 200, "no": 200})
    assert plan.mode == "rows" and plan.rows == {"yes": 40, "no": 40}
    assert "whole-class hold-out is impossible" in plan.describe(2)
    big = hold_out({"a": 100_000, "b": 50_000})
    assert big.rows == {"a": 1000, "b": 1000}  # capped: retrieval costs the square


def test_max_length_follows_the_texts_and_the_model():
    assert max_length_for([10] * 100, None) == 32
    assert max_length_for([60] * 100, None) == 128
    assert max_length_for([1000] * 100, None) == 256
    assert max_length_for([1000] * 100, 128) == 128


def test_nice_numbers():
    assert [nice(x) for x in (0.5, 1, 3, 7, 12, 49, 250, 999)] == [1, 1, 2, 5, 10, 20, 200, 500]


def test_labelled_helper_rows_fill_as_batch_fill_says():
    rows = labelled(2, 50)
    assert batch_fill([50, 50], 16, 4)[0] == "reuse" and len({r[1] for r in rows}) == 2
