"""`tripletctl init`'s look at the data: a bounded streaming sample read through sources.py (the reader
training uses, `load_dataset` arguments passed through unchanged), the layout and columns it fits,
its classes and rows per class; and the train and held-out files `init` writes beside a curriculum.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tripletctl.config.blocks import SourceConfig
from tripletctl.config.layouts import LABELLED, LAYOUT_OF
from tripletctl.config.sizing import HoldOut
from tripletctl.core.errors import DataError, one_line
from tripletctl.core.jsonio import replace_text
from tripletctl.data.sources import (
    CHUNK_ROWS,
    Columns,
    columns_problem,
    load,
    negative_columns_in,
    resolve,
    rows_of_chunk,
)

SAMPLE_ROWS = 50_000  # rows init reads at most: a small corpus whole, a large one's first rows
LABEL_NAMES = ("label", "labels", "category", "class", "topic", "module", "section", "tag", "target", "y")
TEXT_NAMES = ("text", "sentence", "content", "body", "document", "docstring", "description", "question")


@dataclass
class Survey:
    """What the sample says: the source with its layout and columns chosen, the usable rows read
    (normalised as training reads them), and how the columns were chosen."""

    config: SourceConfig
    columns: tuple[str, ...]
    rows: list[list]
    rows_read: int
    complete: bool  # the whole source was read
    chosen: list[str] = field(default_factory=list)  # lines: a guessed column and why

    @property
    def grouped(self) -> bool:
        return LAYOUT_OF[self.config.layout].grouped

    def class_texts(self, rows: Iterable[list] | None = None) -> dict[Hashable, list[str]]:
        """Distinct texts per class (labelled), in order of first appearance."""
        classes: dict[Hashable, dict[str, None]] = {}
        for text, label in self.rows if rows is None else rows:
            classes.setdefault(label, {})[text] = None
        return {label: list(texts) for label, texts in classes.items()}


def _read(config: SourceConfig, max_rows: int) -> tuple[list[dict[str, list]], int, bool]:
    src = resolve(config.source, config.format)
    ds = load(src, config.split, dict(config.load_dataset or {}), None)
    chunks, read = [], 0
    try:
        for chunk in ds.iter(batch_size=CHUNK_ROWS):
            n = len(next(iter(chunk.values()))) if chunk else 0
            if read + n > max_rows:
                chunk = {name: values[: max_rows - read] for name, values in chunk.items()}
                n = max_rows - read
            chunks.append(chunk)
            read += n
            if read >= max_rows:
                return chunks, read, False
    except DataError:
        raise
    except Exception as error:  # datasets raises many types
        raise DataError(f"reading data source '{src.label}' failed: {one_line(error)}") from error
    return chunks, read, True


def _strings(chunks: list[dict[str, list]], name: str) -> list[str]:
    return [v for chunk in chunks for v in chunk.get(name, ()) if isinstance(v, str)]


def _pick_text(names: list[str], chunks: list[dict[str, list]], avoid: str | None) -> str | None:
    """`text`, else a usual text column name, else the string column with the longest texts."""
    for name in TEXT_NAMES:
        if name in names and name != avoid:
            return name
    lengths = {n: _strings(chunks, n) for n in names if n != avoid}
    lengths = {n: sum(map(len, v)) / len(v) for n, v in lengths.items() if v}
    return max(lengths, key=lengths.get) if lengths else None


def _pick_label(names: list[str], chunks: list[dict[str, list]], avoid: str | None) -> str | None:
    """`label`, else a usual label column name, else the column with the fewest distinct values (at
    least 2, and on average at least 2 rows each): a class, not an id."""
    for name in LABEL_NAMES:
        if name in names and name != avoid:
            return name
    best, best_count = None, None
    for name in names:
        if name == avoid:
            continue
        values = [json.dumps(v, sort_keys=True, default=str) for chunk in chunks for v in chunk.get(name, ())]
        distinct = len(set(values))
        if 2 <= distinct <= len(values) // 2 and (best_count is None or distinct < best_count):
            best, best_count = name, distinct
    return best


def _choose_columns(config: SourceConfig, given: set[str], names: list[str], chunks: list) -> tuple[SourceConfig, list]:
    """The layout (unless given) and the columns (unless given) these column names fit."""
    said: list[str] = []
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(SourceConfig)}
    if "layout" not in given and config.anchor_column in names and config.positive_column in names:
        negatives = negative_columns_in(names, config)
        values["layout"] = "triplets" if negatives else "pairs"
        if negatives:
            values["negative_columns"] = tuple(negatives)
        said.append(f"layout {values['layout']}: the data has {', '.join(LAYOUT_OF[values['layout']].columns(values))}")
    elif values["layout"] == LABELLED.name and not isinstance(config.source, dict):
        if "text_column" not in given and config.text_column not in names:
            values["text_column"] = _pick_text(names, chunks, values["label_column"]) or config.text_column
            said.append(f"text column '{values['text_column']}' (guessed; --text-column to choose another)")
        if "label_column" not in given and config.label_column not in names:
            values["label_column"] = _pick_label(names, chunks, values["text_column"]) or config.label_column
            said.append(f"label column '{values['label_column']}' (guessed; --label-column to choose another)")
    return SourceConfig(**values), said


def survey(config: SourceConfig, given: set[str], max_rows: int = SAMPLE_ROWS) -> Survey:
    """Read up to `max_rows` rows of the source, choose the layout and columns it fits (those in `given`,
    the option names typed, are kept as typed) and keep the usable rows. A DataError names the columns
    found when none fits."""
    chunks, read, complete = _read(config, max_rows)
    names = list(dict.fromkeys(name for chunk in chunks for name in chunk))
    if not read:
        raise DataError(f"data source '{config.source}' has no rows")
    chosen, said = _choose_columns(config, given, names, chunks)
    src = resolve(chosen.source, chosen.format)
    cols = Columns.of(chosen, src)
    if (problem := columns_problem(names, cols, chosen, src.label)) is not None:
        raise DataError(problem)
    rows = [row for chunk in chunks for row in rows_of_chunk(chunk, cols)[0]]
    if not rows:
        raise DataError(f"no usable rows in the first {read:,} rows of '{src.label}' (columns {', '.join(cols.names)})")
    return Survey(chosen, tuple(names), rows, read, complete, said)


# ----------------------------------------------------------------------------- the files init writes


def split_rows(found: Survey, holdout: HoldOut | None, seed: int = 0) -> tuple[list[list], list[list]]:
    """(train rows, held-out rows). Labelled: the held-out classes' rows, or per class a seeded sample
    of `holdout.rows[label]` distinct texts (every copy of a held-out text is held out). Pairs and
    triplets: a seeded sample of whole rows, each its own class (`holdout.rows[None]` of them)."""
    if holdout is None:
        return list(found.rows), []
    rng = random.Random(seed)
    if found.grouped:
        count = (holdout.rows or {}).get(None, 0)
        chosen = set(rng.sample(range(len(found.rows)), min(count, len(found.rows) - 2)))
        return (
            [r for i, r in enumerate(found.rows) if i not in chosen],
            [r for i, r in enumerate(found.rows) if i in chosen],
        )
    if holdout.mode == "classes":
        return [r for r in found.rows if r[1] not in holdout.labels], [r for r in found.rows if r[1] in holdout.labels]
    held: set[tuple[Any, str]] = set()
    for label, texts in found.class_texts().items():
        count = (holdout.rows or {}).get(label, 0)
        held |= {(label, text) for text in rng.sample(texts, min(count, len(texts) - 2))} if count else set()
    return [r for r in found.rows if (r[1], r[0]) not in held], [r for r in found.rows if (r[1], r[0]) in held]


def write_rows(path: Path, rows: list[list], config: SourceConfig) -> None:
    """JSON lines under the source's own column names, so the curriculum's columns stay the user's."""
    names = LAYOUT_OF[config.layout].columns(config)
    text = "".join(json.dumps(dict(zip(names, row)), ensure_ascii=False) + "\n" for row in rows)
    os.makedirs(path.parent, exist_ok=True)
    replace_text(path, text)
