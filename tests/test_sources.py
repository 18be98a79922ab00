"""sources.py: resolving sources, formats, layouts and columns, bad rows, one-line errors, finite reads."""

from __future__ import annotations

import json

import pytest
from helpers import NEGATIVES, text_source, triplet_file_rows

from tripletctl.config.blocks import DataConfig, SourceConfig
from tripletctl.core.errors import DataError
from tripletctl.data.sources import check_source, read_rows


def rows_of(source, limit=None, **kw):
    return read_rows(SourceConfig(source=source, **kw), limit=limit)


def cfg(assets_dir, name, **kw) -> DataConfig:
    return DataConfig(source=name if isinstance(name, dict) else str(assets_dir / name), **kw)


# ------------------------------------------------------------------------------ layouts and columns


def test_pairs_read_rows(assets_dir):
    rows = rows_of(str(assets_dir / "pairs.jsonl"), layout="pairs", limit=7)
    assert len(rows.texts) == 6 and rows.labels == [0, 0, 1, 1, 2, 2]


def test_triplets_read_rows(assets_dir):
    rows = rows_of(
        str(assets_dir / "triplets3.jsonl"), layout="triplets", negative_columns=NEGATIVES["triplets3"], limit=16
    )
    assert len(rows.texts) == 15  # whole rows of 5 texts only
    assert rows.labels == [0, 0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 8, 9, 10, 11]
    assert rows.triplets == [
        (0, 1, 2),
        (0, 1, 3),
        (0, 1, 4),
        (5, 6, 7),
        (5, 6, 8),
        (5, 6, 9),
        (10, 11, 12),
        (10, 11, 13),
        (10, 11, 14),
    ]
    expected = triplet_file_rows(assets_dir / "triplets3.jsonl")[:3]
    assert [tuple(rows.texts[i : i + 5]) for i in (0, 5, 10)] == expected
    assert rows_of(str(assets_dir / "pairs.jsonl"), layout="pairs").triplets == []


MISMATCHES = [  # (file, layout and columns, what the message names: found columns and the layout that fits)
    ("triplets.jsonl", {"layout": "pairs"}, "would drop the negative column 'negative'", "layout triplets would fit"),
    (
        "triplets3.csv",
        {"layout": "pairs"},
        "would drop the negative columns 'negative_1', 'negative_2', 'negative_3'",
        "layout triplets with negative columns negative_1, negative_2, negative_3 would fit",
    ),
    (
        "triplets3.parquet",
        {"layout": "triplets"},
        "column 'negative' not found",
        "layout triplets with negative columns negative_1, negative_2, negative_3 would fit",
    ),
    ("triplets.jsonl", {}, "columns 'text', 'label' not found", "layout triplets would fit"),
    ("pairs.jsonl", {}, "columns 'text', 'label' not found", "layout pairs would fit"),
    ("pairs.jsonl", {"layout": "triplets"}, "column 'negative' not found", "layout pairs would fit"),
    ("train.jsonl", {"layout": "pairs"}, "columns 'anchor', 'positive' not found", "layout labelled would fit"),
    (
        "train.parquet",
        {"layout": "triplets"},
        "columns 'anchor', 'positive', 'negative' not found",
        "layout labelled would fit",
    ),
    ("triplets.jsonl", {"layout": "triplets", "anchor_column": "query"}, "column 'query' not found", "no layout fits"),
    ("wrong_columns.jsonl", {"layout": "pairs"}, "columns 'anchor', 'positive' not found", "no layout fits"),
]


@pytest.mark.parametrize("name, config, problem, fits", MISMATCHES)
def test_layout_and_columns_mismatch_is_one_line(assets_dir, name, config, problem, fits):
    import pandas as pd

    source = str(assets_dir / name)
    path = assets_dir / name
    frame = (
        pd.read_json(path, lines=True, nrows=1)
        if path.suffix == ".jsonl"
        else pd.read_parquet(path)
        if path.suffix == ".parquet"
        else pd.read_csv(path, nrows=1)
    )
    found = ", ".join(frame.columns)
    for call in (lambda: check_source(DataConfig(source=source, **config)), lambda: rows_of(source, **config)):
        with pytest.raises(DataError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and problem in message and fits in message, message
        assert f"available columns: {found}" in message and f"layout {config.get('layout', 'labelled')}" in message


# ------------------------------------------------------------------------------ rows and formats


def test_bad_rows_are_skipped_and_counted(assets_dir):
    rows = rows_of(str(assets_dir / "bad_rows.jsonl"))
    assert rows.skipped == 25 and len(rows.texts) == 15
    assert all(t.strip() for t in rows.texts)
    check_source(cfg(assets_dir, "bad_rows.jsonl", samples_per_class=2))  # usable rows exist: no error


def test_formats_give_the_same_rows(assets_dir):
    def pairs(rows):
        names = {}
        return sorted((t, names.setdefault(lab, t.split()[0])) for t, lab in zip(rows.texts, rows.labels))

    expected = pairs(rows_of(str(assets_dir / "train.jsonl")))
    assert len(expected) == 60
    assert pairs(rows_of(str(assets_dir / "train.parquet"))) == expected
    assert pairs(rows_of(str(assets_dir / "train.csv"))) == expected
    assert pairs(rows_of(text_source(assets_dir))) == expected
    assert pairs(rows_of(str(assets_dir / "train.j*l"))) == expected  # glob
    # jsonl, parquet and csv keep the file order
    assert rows_of(str(assets_dir / "train.csv")).texts == rows_of(str(assets_dir / "train.jsonl")).texts
    assert len(rows_of(str(assets_dir / "train.jsonl"), limit=25).texts) == 25


# ------------------------------------------------------------------------------ errors


def test_missing_column_lists_existing_columns(assets_dir):
    with pytest.raises(DataError) as err:
        check_source(cfg(assets_dir, "wrong_columns.jsonl"))
    message = str(err.value)
    assert "'text'" in message and "body" in message and "topic" in message and "\n" not in message
    with pytest.raises(DataError, match="available columns: text, label"):
        check_source(cfg(assets_dir, "train.jsonl", label_column="topic"))


def test_missing_files_and_no_rows(assets_dir, tmp_path):
    with pytest.raises(DataError, match="no files match .*nothing-\\*.jsonl"):
        check_source(cfg(assets_dir, "nothing-*.jsonl"))
    with pytest.raises(DataError, match="no files match"):
        rows_of(str(tmp_path / "absent.parquet"))
    with pytest.raises(DataError, match="no files match"):
        check_source(cfg(assets_dir, {"a": str(tmp_path / "none-*.txt")}))
    with pytest.raises(DataError, match="no usable rows"):
        check_source(cfg(assets_dir, "all_bad.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError):
        check_source(DataConfig(source=str(tmp_path / "empty.jsonl")))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_an_empty_file_says_why(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    for call in (lambda: check_source(DataConfig(source=str(path))), lambda: read_rows(SourceConfig(source=str(path)))):
        with pytest.raises(DataError) as caught:
            call()
        message = str(caught.value)
        reason = message.rsplit("): ", 1)[-1] if "): " in message else message.rsplit(": ", 1)[-1]
        assert reason.strip() and str(path) in message
        assert "empty" in message or "No columns" in message


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "txt"])
def test_invalid_utf8_names_the_real_byte_offset_and_line(tmp_path, fmt, capfd):
    """The libraries say "position 0" of an internal block; the error names the file's own offset,
    and CSV's raw `datasets` log line is not printed before it."""
    rows = [(f"row {i} some words here", f"c{i % 4}") for i in range(200)]
    if fmt == "jsonl":
        text = "".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows)
    elif fmt == "csv":
        text = "text,label\n" + "".join(f"{t},{label}\n" for t, label in rows)
    else:
        text = "".join(f"{t}\n" for t, _ in rows)
    data = text.encode()
    offset = data.index(b"row 10 ")
    path = tmp_path / f"bad.{fmt}"
    path.write_bytes(data[:offset] + b"\xff" + data[offset:])
    line = data.count(b"\n", 0, offset) + 1
    source = {"a": str(path), "b": str(path)} if fmt == "txt" else str(path)
    with pytest.raises(DataError) as caught:
        read_rows(SourceConfig(source=source))
    assert f"is not UTF-8: byte 0xff at byte offset {offset} (line {line})" in str(caught.value)
    assert "Failed to read file" not in capfd.readouterr().err


def test_the_first_bad_byte_is_found_across_read_blocks(tmp_path):
    from tripletctl.data.sources import _first_bad_utf8

    path = tmp_path / "big.txt"
    good = ("é" * 10 + "\n").encode()  # 2-byte characters: some straddle the 1 MiB block boundary
    body = good * ((1 << 20) // len(good) + 7)
    path.write_bytes(body + b"\x80rest\n")
    assert _first_bad_utf8(str(path)) == (len(body), body.count(b"\n") + 1, 0x80)
    path.write_bytes(body)
    assert _first_bad_utf8(str(path)) is None
