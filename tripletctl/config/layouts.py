"""What a row of a source is (`data.layout`, `eval.layout`), declared once: every module that
behaves differently per layout asks the `Layout` here instead of comparing names (docs/data.md, Layouts).

A new layout is one `Layout` below, its rows in data/sources.py (`rows_of_chunk`, `read_rows`) and,
if its rows are not labelled texts, a batcher in data/batching.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    name: str
    column_keys: tuple[str, ...]  # the SourceConfig keys naming its columns, in row order
    grouped: bool  # a row is a group of texts of one class by construction (no label column)
    given_negatives: bool  # the row brings negatives of its own
    class_of_a_row: str | None = None  # grouped: why a class holds exactly 2 texts, for messages

    def columns(self, source) -> tuple[str, ...]:
        """The column names a row of `source` reads, in row order: a SourceConfig, or the dict of its
        values while a block is being checked (a key not given is None there)."""
        get = source.get if isinstance(source, dict) else lambda key: getattr(source, key)
        names: list[str] = []
        for key in self.column_keys:
            value = get(key)
            names += list(value) if isinstance(value, (list, tuple)) else [value]
        return tuple(names)


LABELLED = Layout("labelled", ("text_column", "label_column"), grouped=False, given_negatives=False)
PAIRS = Layout("pairs", ("anchor_column", "positive_column"), True, False, class_of_a_row="each pair is its own class")
TRIPLETS = Layout(
    "triplets",
    ("anchor_column", "positive_column", "negative_columns"),
    True,
    True,
    class_of_a_row="each row's anchor and positive are its class",
)
LAYOUT_OF = {layout.name: layout for layout in (LABELLED, PAIRS, TRIPLETS)}
LAYOUTS = tuple(LAYOUT_OF)  # the choices of data.layout / eval.layout
