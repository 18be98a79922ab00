"""What the commands of cli.py and cli_models.py share: the consoles, `fail` (a TripletctlError as its
lines on stderr and its exit code), `quiet_libraries`, and the held-out source options of `eval`,
`compare` and `inspect-collapse`, declared once (Typer declarations, no logic)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from tripletctl.core.errors import TripletctlError

console = Console()
err_console = Console(stderr=True)
PIPE_WIDTH = 1000  # stdout to a file or pipe: tables take the width they need, nothing wraps mid-word


def fail(error: TripletctlError) -> None:
    """Print every problem on its own line (markup off: messages quote user text) and exit 2."""
    problems = getattr(error, "problems", None) or [str(error)]
    if len(problems) > 1:
        err_console.print(f"[bold red]error:[/] {len(problems)} problems")
    for problem in problems:
        err_console.print("[bold red]error:[/] ", end="")
        err_console.print(problem, highlight=False, soft_wrap=True, markup=False)
    raise typer.Exit(code=error.exit_code)


def quiet_libraries() -> None:
    """Our own progress bars and messages replace the libraries' per-file ones. Called by the commands
    that load models and data, not at start-up: `validate` and `--help` never pay for importing
    datasets and transformers (about 2 s)."""
    try:
        import datasets
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


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
