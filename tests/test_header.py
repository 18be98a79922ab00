"""data/header.py: what `validate` (and `train`, before any model is built) reads of local data, checked
against the reader training uses (sources.py through `datasets`), and the problems it adds to the one
list `validate` prints."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
import yaml
from helpers import TINY_BERT
from typer.testing import CliRunner

from tripletctl.cli import app
from tripletctl.config.blocks import SourceConfig
from tripletctl.data.header import read_facts
from tripletctl.data.sources import read_rows

FILES = ["train.jsonl", "train.csv", "train.parquet", "bad_rows.jsonl", "two_class.jsonl", "many_class.jsonl"]


@pytest.mark.parametrize("name", FILES)
def test_the_header_counts_what_training_reads(assets_dir, name):
    config = SourceConfig(source=str(assets_dir / name))
    facts = read_facts(config)
    rows = read_rows(config)  # datasets, as training reads it
    per_class = Counter()
    for _text, label in {(t, lab) for t, lab in zip(rows.texts, rows.labels)}:
        per_class[label] += 1
    assert facts.problems == () and facts.complete
    assert facts.usable_rows == len(rows.texts) and facts.rows_read == len(rows.texts) + rows.skipped
    assert facts.class_rows == tuple(sorted(per_class.values(), reverse=True))


def test_plain_text_files_count_one_class_per_file(assets_dir):
    source = {f"c{c}": str(assets_dir / "text" / f"c{c}.txt") for c in range(6)}
    facts = read_facts(SourceConfig(source=source, format="text"))
    assert facts.columns == ("text", "label") and facts.class_rows == (10,) * 6


def test_a_hub_name_is_not_read_and_a_missing_file_is_a_note(tmp_path):
    assert read_facts(SourceConfig(source="org/some-dataset")) is None
    facts = read_facts(SourceConfig(source=str(tmp_path / "absent.jsonl")))
    assert facts.note.startswith("not checked here: no files match") and facts.problems == ()


def test_wrong_columns_and_a_split_of_a_local_file_are_problems(assets_dir):
    facts = read_facts(SourceConfig(source=str(assets_dir / "two_class.jsonl"), label_column="category"))
    assert facts.problems == (
        f"data source '{assets_dir / 'two_class.jsonl'}' does not fit layout labelled: column 'category' not "
        f"found; available columns: text, label; set label_column (--label-column on the command line) to one of label",
    )
    split = read_facts(SourceConfig(source=str(assets_dir / "two_class.jsonl"), split="test"))
    assert "local files have one split" in split.problems[0]


def test_only_the_first_rows_are_read_and_then_counts_are_lower_bounds(assets_dir):
    facts = read_facts(SourceConfig(source=str(assets_dir / "many_class.jsonl")), max_rows=1000)
    assert not facts.complete and facts.rows_read == 1000


def _curriculum(tmp_path, assets_dir, batches=(12, 48), data: str = "two_class.jsonl") -> str:
    spec = {
        "model": {"name": str(TINY_BERT), "init": "config"},
        "data": {"source": str(assets_dir / data), "samples_per_class": 2},
        "phases": [
            {"name": f"p{i}", "mining": "semi-hard", "batch_size": b, "steps": 2} for i, b in enumerate(batches)
        ],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_validate_catches_a_wrong_column_with_every_other_problem(tmp_path, assets_dir):
    """Issue 36, item 4: `validate cur.yaml data.label_column=category` exited 0; `train` failed 37 s later."""
    path = _curriculum(tmp_path, assets_dir, batches=(12, 1000))
    result = CliRunner().invoke(app, ["validate", path, "data.label_column=category", "train.lr=fast"])
    assert result.exit_code == 2
    assert "error: 2 problems" in result.output  # the column and the lr: one list
    assert "column 'category' not found; available columns: text, label" in result.output
    assert "train.lr must be a positive number" in result.output
    result = CliRunner().invoke(app, ["validate", path])  # the right column: the batch of 1000 is the problem
    assert result.exit_code == 2
    assert "phases[1] (p1): batch_size 1000 cannot be filled from data.source" in result.output
    assert "2 classes with at least 2 distinct rows (500 needed for 500 × 2)" in result.output


def test_validate_says_what_it_read_and_which_batches_reuse_classes(tmp_path, assets_dir):
    result = CliRunner().invoke(app, ["validate", _curriculum(tmp_path, assets_dir)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert (
        "data: all 400 rows read, 400 usable, 2 classes of 200-200 distinct rows; columns text, label" in result.output
    )
    assert "batch: phase 1 (p1) batch 48 has all 2 classes in every batch, about 24 rows each" in result.output


def test_validate_counts_the_classes_too_small_for_samples_per_class(tmp_path, assets_dir):
    """Classes with fewer distinct rows than samples_per_class never fill, so no batch takes their rows:
    validate says how many (debsource: half its rows at 4 a class), and what 2 a class would take."""
    sizes = [1, 2, 2, 3, 4, 5] + [6] * 20  # distinct rows per class
    source = tmp_path / "small_classes.jsonl"
    source.write_text(
        "".join(f'{{"text": "c{c} row {i}", "label": "c{c}"}}\n' for c, n in enumerate(sizes) for i in range(n))
    )
    path = _curriculum(tmp_path, assets_dir, batches=(8, 16), data=str(source))
    result = CliRunner().invoke(app, ["validate", path, "data.samples_per_class=4"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    small = [n for n in sizes if n < 4]
    assert (
        f"data: {len(small)} of {len(sizes)} classes ({sum(small)} of {sum(sizes)} rows) hold fewer than "
        f"samples_per_class (4) distinct rows: no batch takes them; data.samples_per_class=2 would take "
        f"{sum(1 for n in small if n >= 2)} of them" in " ".join(result.output.split())
    )
    result = CliRunner().invoke(app, ["validate", path], env={"COLUMNS": "200"})  # 2 a class: only the 1-row class
    assert (
        f"data: 1 of 26 classes (1 of {sum(sizes)} rows) hold fewer than samples_per_class (2) distinct rows"
        in " ".join(result.output.split())
    )
    assert "would take" not in result.output


@pytest.mark.slow
def test_train_stops_on_the_column_before_building_a_model(tmp_path, assets_dir):
    path = _curriculum(tmp_path, assets_dir)
    result = subprocess.run(
        [sys.executable, "-m", "tripletctl", "train", path, "data.label_column=category"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "column 'category' not found" in result.stderr
    assert not (tmp_path / "runs").exists()
