"""The paired bootstrap against a brute-force loop with the same seeds, its blocks, its scale and
its verdicts, on plain arrays (tests/test_compare.py and tests/test_compare_command.py run it on models)."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from tripletctl.evaluation.bootstrap import better_side, paired_bootstrap, resampled_mean_differences


def brute_force_bootstrap(a: dict, b: dict, resamples: int, seed: int, confidence: float = 0.95) -> dict:
    """Straight from the definition, one resample and one query at a time in Python: resample r is
    the r-th `rng.integers(0, n, size=n)` draw (the module's documented contract), the same for
    every metric; the interval is the linear-interpolation percentile of the sorted differences."""
    names = list(a)
    n = len(a[names[0]])
    rng = np.random.default_rng(seed)
    diffs = {name: [] for name in names}
    for _ in range(resamples):
        picked = [int(i) for i in rng.integers(0, n, size=n)]
        for name in names:
            diffs[name].append(sum(float(b[name][i]) - float(a[name][i]) for i in picked) / n)

    def percentile(values: list[float], p: float) -> float:
        ordered = sorted(values)
        h = (len(ordered) - 1) * p
        lo = math.floor(h)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])

    tail = (1 - confidence) / 2
    out = {}
    for name in names:
        mean_a = sum(map(float, a[name])) / n
        mean_b = sum(map(float, b[name])) / n
        out[name] = {
            "a": mean_a,
            "b": mean_b,
            "diff": mean_b - mean_a,
            "low": percentile(diffs[name], tail),
            "high": percentile(diffs[name], 1 - tail),
        }
    return out


def per_query_pair(n: int, seed: int, gain: float = 0.0) -> tuple[dict, dict]:
    """Hit-like 0/1 values and AP-like values in [0, 1] for two models on the same n queries."""
    rng = np.random.default_rng(seed)
    a = {"recall@1": (rng.random(n) < 0.5).astype(np.float64), "map@r": rng.random(n)}
    b = {
        "recall@1": (rng.random(n) < 0.5 + gain).astype(np.float64),
        "map@r": np.clip(a["map@r"] + gain + 0.3 * rng.normal(size=n), 0, 1),
    }
    return a, b


@pytest.mark.parametrize(
    "n,resamples,seed,block_values,confidence",
    [(37, 300, 0, 1 << 22, 0.95), (50, 257, 3, 50 * 7, 0.95), (9, 1000, 11, 10, 0.9), (120, 200, 5, 1, 0.99)],
)
def test_matches_a_brute_force_loop_with_the_same_seed(n, resamples, seed, block_values, confidence):
    a, b = per_query_pair(n, seed, gain=0.05)
    got = paired_bootstrap(a, b, resamples=resamples, seed=seed, confidence=confidence, block_values=block_values)
    want = brute_force_bootstrap(a, b, resamples, seed, confidence)
    assert set(got) == set(want)
    for name in want:
        for key in ("a", "b", "diff", "low", "high"):
            assert got[name][key] == pytest.approx(want[name][key], abs=1e-12), (name, key)
        assert got[name]["better"] == better_side(want[name]["low"], want[name]["high"])


def test_the_result_does_not_depend_on_the_block_size():
    a, b = per_query_pair(83, 1, gain=0.02)
    diffs = {name: b[name] - a[name] for name in a}
    whole = resampled_mean_differences(diffs, 500, seed=4, block_values=1 << 30)
    for block_values in (1, 83, 83 * 3 + 5, 83 * 499):
        blocked = resampled_mean_differences(diffs, 500, seed=4, block_values=block_values)
        for name in diffs:
            np.testing.assert_array_equal(blocked[name], whole[name])
    # one index set for every metric: a metric that is a copy of another resamples identically
    twins = resampled_mean_differences({"x": diffs["map@r"], "y": diffs["map@r"].copy()}, 300, seed=2)
    np.testing.assert_array_equal(twins["x"], twins["y"])


def test_a_model_against_itself_has_no_detectable_difference():
    a, _ = per_query_pair(200, 0)
    result = paired_bootstrap(a, {k: v.copy() for k, v in a.items()}, resamples=1000, seed=0)
    for entry in result.values():
        assert entry["diff"] == entry["low"] == entry["high"] == 0.0
        assert entry["a"] == entry["b"] and entry["better"] is None


def test_a_clearly_better_model_is_detected_on_either_side():
    a, b = per_query_pair(600, 7, gain=0.2)
    result = paired_bootstrap(a, b, resamples=2000, seed=1)
    for name, entry in result.items():
        assert 0 < entry["low"] <= entry["diff"] <= entry["high"], name
        assert entry["better"] == "b"
    swapped = paired_bootstrap(b, a, resamples=2000, seed=1)
    for name, entry in swapped.items():
        assert entry["low"] <= entry["high"] < 0 and entry["better"] == "a", name
        assert entry["diff"] == pytest.approx(-result[name]["diff"], abs=1e-15)


def test_pairing_removes_what_both_models_share():
    # B = A + a small constant: unpaired, the spread of A alone would swamp 0.01; paired, it is exact
    rng = np.random.default_rng(0)
    a = {"map@r": rng.random(500)}
    b = {"map@r": a["map@r"] + 0.01}
    entry = paired_bootstrap(a, b, resamples=1000, seed=0)["map@r"]
    assert entry["low"] == pytest.approx(0.01) and entry["high"] == pytest.approx(0.01)
    assert entry["better"] == "b"


def test_the_interval_has_the_normal_theory_width():
    # n iid N(0, 1) differences: the 95% interval of their mean is about +-1.96/sqrt(n) around it
    n = 4000
    diff = np.random.default_rng(5).normal(size=n)
    entry = paired_bootstrap({"m": np.zeros(n)}, {"m": diff}, resamples=4000, seed=3)["m"]
    half_width = (entry["high"] - entry["low"]) / 2
    assert half_width == pytest.approx(1.96 * diff.std() / math.sqrt(n), rel=0.06)
    assert (entry["high"] + entry["low"]) / 2 == pytest.approx(entry["diff"], abs=0.004)


@pytest.mark.slow
def test_memory_stays_bounded_by_the_block():
    # 200,000 queries x 1,000 resamples would be 1.6 GB of indices at once; blocks of 2^20 are 8 MB
    n, resamples = 200_000, 1000
    values = {"m": np.random.default_rng(0).random(n)}
    tracemalloc.start()
    try:
        resampled_mean_differences(values, resamples, seed=0, block_values=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40e6, peak


@pytest.mark.parametrize(
    "a,b,kwargs,message",
    [
        ({"m": np.zeros(5)}, {"m": np.zeros(6)}, {}, "one length"),
        ({"m": np.zeros(5)}, {"n": np.zeros(5)}, {}, "different metrics"),
        ({"m": np.zeros((5, 2))}, {"m": np.zeros((5, 2))}, {}, "1-D"),
        ({"m": np.zeros(0)}, {"m": np.zeros(0)}, {}, "no queries"),
        ({}, {}, {}, "no metric"),
        ({"m": np.array([0.0, np.nan])}, {"m": np.zeros(2)}, {}, "A's per-query m holds NaN"),
        ({"m": np.zeros(3)}, {"m": np.zeros(3)}, {"resamples": 0}, "at least 1"),
        ({"m": np.zeros(3)}, {"m": np.zeros(3)}, {"confidence": 1.0}, "strictly between"),
    ],
)
def test_bad_input_is_refused(a, b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(a, b, **kwargs)


def test_better_side():
    assert better_side(0.01, 0.2) == "b"
    assert better_side(-0.2, -0.01) == "a"
    assert better_side(-0.1, 0.1) is None
    assert better_side(0.0, 0.1) is None and better_side(-0.1, 0.0) is None  # touching 0 holds 0
