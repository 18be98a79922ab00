"""tripletctl/train/mined_negatives.py and the `mined_negatives` key: the mined rows against a
brute-force loop over classes and candidates, batches extended to the phase's batch_size, a table
that restores exactly (tensors only) and refuses a damaged one, and the CLI end to end (a run that
resumes exactly, impossible settings as one-line errors)."""

from __future__ import annotations

import io
import itertools
import json

import pytest
import torch
import yaml

from tripletctl.config.mined_negatives import MinedNegativesConfig, stream_rows
from tripletctl.data.stream import Batch
from tripletctl.train.mined_negatives import MinedTable, mine_pool


def _pool(seed: int = 0, classes: int = 9, dim: int = 6):
    """Clustered rows: classes of 1 to 4 rows around their own centre (pairwise cosines well above 0)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    sizes = torch.randint(1, 5, (classes,), generator=g).tolist()
    labels = torch.tensor([c * 1000 + 7 for c, n in enumerate(sizes) for _ in range(n)])
    rows = torch.cat([centres[c] + 0.4 * torch.randn(n, dim, generator=g) for c, n in enumerate(sizes)])
    return rows, labels


def _brute_force(rows: torch.Tensor, labels: torch.Tensor, config: MinedNegativesConfig) -> dict[int, list[int]]:
    """Each class's candidates by a plain loop: the mean cosine of its rows to the candidate, kept at
    or below max_ratio x the mean cosine over its pairs of distinct rows (1 for one row), best first,
    skip_top dropped, per_class taken (None where too few pass)."""
    x = [r / r.norm() for r in rows.double()]
    out = {}
    for label in sorted(set(labels.tolist())):
        own = [i for i, lab in enumerate(labels.tolist()) if lab == label]
        pairs = [float(x[i] @ x[k]) for i, k in itertools.permutations(own, 2)]
        limit = config.max_ratio * (sum(pairs) / len(pairs) if pairs else 1.0)
        scored = []
        for j in range(len(x)):
            if labels[j] == label:
                continue
            score = sum(float(x[i] @ x[j]) for i in own) / len(own)
            if score <= limit:
                scored.append((score, j))
        ranked = [j for _, j in sorted(scored, reverse=True)][config.skip_top :]
        out[label] = ranked[: config.per_class] if len(ranked) >= config.per_class else None
    return out


@pytest.mark.parametrize(("max_ratio", "skip_top"), [(1.0, 0), (0.95, 1), (0.7, 2), (0.5, 1)])
def test_mined_rows_match_a_brute_force_loop(max_ratio, skip_top):
    rows, labels = _pool()
    config = MinedNegativesConfig(per_class=2, max_ratio=max_ratio, skip_top=skip_top)
    class_ids, chosen, filled = mine_pool(rows, labels, config, torch.Generator().manual_seed(0))
    expected = _brute_force(rows, labels, config)
    assert class_ids.tolist() == sorted(expected)
    assert filled == 2 * sum(v is None for v in expected.values())
    for label, picked in zip(class_ids.tolist(), chosen.tolist()):
        assert all(labels[j] != label for j in picked)  # never a row of its own class
        if expected[label] is not None:
            assert picked == expected[label], label


def test_too_few_candidates_are_filled_with_other_classes_at_random():
    rows, labels = _pool(seed=1)
    rows = torch.ones_like(rows) + 0.05 * rows  # every pair at a cosine near 1: nothing is below half of it
    config = MinedNegativesConfig(per_class=3, max_ratio=0.5)
    class_ids, chosen, filled = mine_pool(rows, labels, config, torch.Generator().manual_seed(0))
    assert filled == chosen.numel() and chosen.shape == (len(class_ids), 3)
    for label, picked in zip(class_ids.tolist(), chosen.tolist()):
        assert all(labels[j] != label for j in picked)


def test_a_pool_of_one_class_is_an_error():
    from tripletctl.core.errors import DataError

    with pytest.raises(DataError, match="raise pool_rows"):
        mine_pool(torch.randn(5, 3), torch.zeros(5, dtype=torch.int64), MinedNegativesConfig(per_class=1), None)


def _table() -> MinedTable:
    """Classes 10 and 20 bring rows (0, 1) and (2, 0); the reserve is rows 3 and 4."""
    lengths = torch.tensor([2, 3, 1, 2, 4])
    return MinedTable(
        class_ids=torch.tensor([10, 20]),
        negatives=torch.tensor([[0, 1], [2, 0]]),
        reserve=torch.tensor([3, 4]),
        row_tokens=torch.arange(100, 100 + int(lengths.sum())),
        row_lengths=lengths,
        row_labels=torch.tensor([30, 40, 50, 60, 70]),
    )


def _batch(labels: list[int], index: int = 3) -> Batch:
    lengths = torch.full((len(labels),), 2)
    return Batch(
        token_ids=torch.arange(2 * len(labels)),
        lengths=lengths,
        labels=torch.tensor(labels),
        state={},
        rows_seen=0,
        rows_skipped=0,
        classes_evicted=0,
        index=index,
    )


def test_a_batch_brings_each_of_its_classes_mined_rows_after_its_own():
    table = _table()
    extended = table.extend(_batch([20, 20, 10, 10, 99, 99]), samples_per_class=2, seed=5)
    # three classes of 2 rows: 3 x 2 mined rows, class 20's, then 10's, then two from the reserve for 99
    assert extended.labels[:6].tolist() == [20, 20, 10, 10, 99, 99]
    assert extended.labels[6:10].tolist() == [50, 30, 30, 40]
    assert set(extended.labels[10:].tolist()) <= {60, 70}
    assert len(extended.labels) == stream_rows(12, 2, MinedNegativesConfig(per_class=2)) + 6
    starts = [0, 2, 5, 6, 8]
    want = torch.cat([table.row_tokens[starts[r] : starts[r] + int(table.row_lengths[r])] for r in (2, 0, 0, 1)])
    assert torch.equal(extended.token_ids[12 : 12 + len(want)], want)
    assert extended.lengths[6:10].tolist() == [1, 2, 2, 3]
    assert int(extended.lengths.sum()) == len(extended.token_ids)
    again = table.extend(_batch([20, 20, 10, 10, 99, 99]), samples_per_class=2, seed=5)
    assert torch.equal(again.labels, extended.labels)  # the reserve's draw is seeded by the batch


def test_table_restores_exactly_through_weights_only_load():
    table = _table()
    buffer = io.BytesIO()
    torch.save(table.state_dict(), buffer)
    buffer.seek(0)
    restored = MinedTable.from_state_dict(torch.load(buffer, weights_only=True))
    batch = _batch([10, 10, 77, 77])
    assert torch.equal(restored.extend(batch, 2, 1).token_ids, table.extend(batch, 2, 1).token_ids)


def test_a_damaged_table_is_a_value_error():
    state = _table().state_dict()
    for junk in (
        [],
        {k: v for k, v in state.items() if k != "negatives"},
        {**state, "negatives": state["negatives"].float()},
        {**state, "negatives": torch.tensor([[0, 9], [1, 2]])},
        {**state, "reserve": torch.tensor([], dtype=torch.int64)},
        {**state, "row_tokens": state["row_tokens"][:-1]},
        {**state, "class_ids": torch.tensor([10])},
        {**state, "row_labels": "x"},
    ):
        with pytest.raises(ValueError):
            MinedTable.from_state_dict(junk)


# ----------------------------------------------------------------------------- the CLI end to end


def _mined_curriculum(directory, **mined):
    """The test curriculum (4 rows a class) with mined negatives from its second phase on: batches of
    36 and 66 texts, 6 a class (4 its own, 2 mined)."""
    from helpers import write_curriculum

    path = write_curriculum(directory, checkpoint_every=2)
    spec = yaml.safe_load(path.read_text())
    for phase, batch in zip(spec["phases"][1:], (36, 66)):
        phase.update(batch_size=batch, mined_negatives={"per_class": 2, "pool_rows": 300, **mined})
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow
def test_resume_with_mined_negatives_matches_uninterrupted_run(tmp_path, interrupt_after=6):
    """Stopped inside phase 1 (its table in the checkpoint), resumed: the same metrics and weights as a
    straight run, and the phase logged its pass once."""
    from helpers import final_weights

    from tripletctl.config.validate import load_curriculum
    from tripletctl.train.run import train

    straight, broken = _mined_curriculum(tmp_path / "straight"), _mined_curriculum(tmp_path / "broken")
    assert train(load_curriculum(straight)) == 0
    assert train(load_curriculum(broken), max_steps=interrupt_after) == 0
    assert (tmp_path / "broken" / "run" / "phase-1-hard-negative" / "checkpoint" / "mined.pt").exists()
    assert train(load_curriculum(broken), resume=True) == 0
    a, b = final_weights(tmp_path / "straight" / "run"), final_weights(tmp_path / "broken" / "run")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    for phase_dir in sorted((tmp_path / "straight" / "run").glob("phase-*")):
        lines = [
            [json.loads(line) for line in (run / phase_dir.name / "metrics.jsonl").read_text().splitlines()]
            for run in (tmp_path / "straight" / "run", tmp_path / "broken" / "run")
        ]
        assert [r.get("loss") for r in lines[0]] == pytest.approx([r.get("loss") for r in lines[1]], abs=1e-6)
        events = [r for r in lines[1] if r.get("event") == "mined_negatives"]
        assert len(events) == (phase_dir.name != "phase-0-semi-hard")
        if events:
            assert events[0]["pool_rows"] == 300 and events[0]["pool_classes"] > 10
    assert not (tmp_path / "straight" / "run" / "phase-2-batch-hard" / "checkpoint" / "mined.pt").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 32}, "batch_size must be a multiple of data.samples_per_class + mined_negatives.per_class (6)"),
        ({"mined_negatives": {"per_class": 2, "pool": 9}}, "unknown key 'pool'; did you mean 'pool_rows'?"),
        ({"mined_negatives": {"pool_rows": 300}}, "per_class is missing"),
        ({"mined_negatives": {"per_class": 0}}, "mined_negatives"),
        ({"mined_negatives": {"per_class": 2, "max_ratio": 1.5}}, "mined_negatives"),
        ({"mined_negatives": 3}, "mined_negatives"),
    ],
)
def test_impossible_settings_are_named_problems(tmp_path, change, message):
    from helpers import only, problems_of

    path = _mined_curriculum(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["phases"][1].update(change)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert "phases[1]" in only(problems_of(path), message)


def test_mined_negatives_on_pairs_is_a_one_line_error_exit_2(tmp_path):
    from helpers import ASSETS
    from typer.testing import CliRunner

    from tripletctl.cli import app

    path = _mined_curriculum(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["data"].update(source=str(ASSETS / "pairs.jsonl"), layout="pairs")
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "phases[1] (hard-negative): mined_negatives needs classes of several rows" in result.output


def test_validate_counts_only_the_rows_the_batcher_draws(tmp_path):
    """5 classes of 4 rows: a batch of 30 texts is 5 classes + 10 mined rows (fillable), while 30 rows
    all from the corpus would need 8 classes (32 rows: refused)."""
    from typer.testing import CliRunner

    from tripletctl.cli import app

    data = tmp_path / "five.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": f"row {r} of class {c}", "label": f"c{c}"}) + "\n" for c in range(5) for r in range(4)
        )
    )
    path = _mined_curriculum(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["data"]["source"] = str(data)
    for phase in spec["phases"]:
        phase["batch_size"] = 16 if "mined_negatives" not in phase else 30
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    del spec["phases"][1]["mined_negatives"]
    spec["phases"][1]["batch_size"] = 32
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "phases[1] (hard-negative): batch_size 32 cannot be filled" in " ".join(
        result.output.split()
    )


@pytest.mark.slow
def test_train_says_what_the_pass_does_before_it_starts(tmp_path):
    """The pass at a phase's start is silent work (minutes on a large pool): the CLI names it first,
    then what it cost; each once, for the two phases that mine."""
    from typer.testing import CliRunner

    from tripletctl.cli import app

    path = _mined_curriculum(tmp_path)
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    for phase in (1, 2):
        starting = f"phase {phase}: mining 2 negatives a class from the first 300 rows of the source"
        assert result.output.count(starting) == 1, result.output
        assert result.output.index(starting) < result.output.index(f"phase {phase}: mined 2 negatives for each of")


def test_the_pool_is_embedded_behind_a_bar_only_when_asked(monkeypatch, tiny_bert_dir):
    """build_table hands its `progress` to the encoder (a transient bar on a terminal, none in a log)."""
    from helpers import ASSETS, tiny_model

    from tripletctl.config.blocks import DataConfig
    from tripletctl.train import mined_negatives

    seen = []
    real_encode = mined_negatives.encode

    def spy(*args, **kwargs):
        seen.append(kwargs.get("progress"))
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(mined_negatives, "encode", spy)
    model, tokenizer = tiny_model(tiny_bert_dir)
    data = DataConfig(source=str(ASSETS / "train.jsonl"), max_length=16)
    config = MinedNegativesConfig(per_class=2, pool_rows=40)
    for progress in (False, True):
        mined_negatives.build_table(
            model, tokenizer, data, config, seed=0, device=torch.device("cpu"), progress=progress
        )
    assert seen == [False, True]
