"""The held-out source options that `eval`, `compare` and `inspect-collapse` share, declared once for
cli.py (Typer declarations only, no logic)."""

from __future__ import annotations

from typing import Annotated

import typer

# The held-out source options of `eval` and `inspect-collapse`, declared once. Each maps 1:1 onto a
# field of curriculum.SourceConfig (tests check both agree); without --data they change the eval
# block saved with the run's curriculum.
SOURCE_OPTIONS = {
    "source": "--data",
    "format": "--format",
    "split": "--split",
    "layout": "--layout",
    "text_column": "--text-column",
    "label_column": "--label-column",
    "anchor_column": "--anchor-column",
    "positive_column": "--positive-column",
    "negative_columns": "--negative-column",
    "load_dataset": "--load-dataset",
}
_PANEL = "Held-out source (default: the run's eval block)"
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Hub dataset name, local file, directory or glob (default: the eval block saved with the run's curriculum).",
        rich_help_panel=_PANEL,
    ),
]
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="json | parquet | csv (default: from the file extension, else the hub).",
        rich_help_panel=_PANEL,
    ),
]
SplitOpt = Annotated[
    str | None, typer.Option("--split", help="Split to read (default: train).", rich_help_panel=_PANEL)
]
LayoutOpt = Annotated[
    str | None,
    typer.Option(
        "--layout", help="labelled | pairs | triplets (docs/data.md) (default: labelled).", rich_help_panel=_PANEL
    ),
]
TextColumnOpt = Annotated[
    str | None, typer.Option("--text-column", help="labelled: text column (default: text).", rich_help_panel=_PANEL)
]
LabelColumnOpt = Annotated[
    str | None, typer.Option("--label-column", help="labelled: label column (default: label).", rich_help_panel=_PANEL)
]
AnchorColumnOpt = Annotated[
    str | None,
    typer.Option("--anchor-column", help="pairs/triplets: anchor column (default: anchor).", rich_help_panel=_PANEL),
]
PositiveColumnOpt = Annotated[
    str | None,
    typer.Option(
        "--positive-column", help="pairs/triplets: positive column (default: positive).", rich_help_panel=_PANEL
    ),
]
NegativeColumnOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--negative-column",
        help="triplets: a negative column; repeat for several (default: negative).",
        rich_help_panel=_PANEL,
        show_default=False,
    ),
]
LoadDatasetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--load-dataset",
        help="KEY=VALUE passed unchanged to datasets.load_dataset, e.g. name=pair; repeatable.",
        rich_help_panel=_PANEL,
        show_default=False,
    ),
]


def source_options(
    data,
    format,
    split,
    layout,
    text_column,
    label_column,
    anchor_column,
    positive_column,
    negative_column,
    load_dataset,
) -> dict:
    """The typed source options by SourceConfig field (None: not given)."""
    return {
        "source": data,
        "format": format,
        "split": split,
        "layout": layout,
        "text_column": text_column,
        "label_column": label_column,
        "anchor_column": anchor_column,
        "positive_column": positive_column,
        "negative_columns": negative_column,
        "load_dataset": load_dataset,
    }
