"""The commands on a trained model or run: `eval`, `compare`, `inspect-collapse`, `plot` and `export`.
Each parses its arguments and calls one function of commands/, evaluation/ or outputs/; cli.py
registers them on the app beside the training commands (`train`, `validate`, `curricula`, `init`)."""

from __future__ import annotations

from pathlib import Path

import typer

from tripletctl.cli_options import (
    SOURCE_OPTIONS,
    AnchorColumnOpt,
    DataOpt,
    FormatOpt,
    LabelColumnOpt,
    LayoutOpt,
    LoadDatasetOpt,
    NegativeColumnOpt,
    PositiveColumnOpt,
    SplitOpt,
    TextColumnOpt,
    console,
    fail,
    quiet_libraries,
    source_options,
)
from tripletctl.core.errors import TripletctlError


def evaluate(
    checkpoint: Path = typer.Argument(
        ..., help="A phase checkpoint, a phase directory or a run directory (latest phase)."
    ),
    data: DataOpt = None,
    format: FormatOpt = None,
    split: SplitOpt = None,
    layout: LayoutOpt = None,
    text_column: TextColumnOpt = None,
    label_column: LabelColumnOpt = None,
    anchor_column: AnchorColumnOpt = None,
    positive_column: PositiveColumnOpt = None,
    negative_column: NegativeColumnOpt = None,
    load_dataset: LoadDatasetOpt = None,
    max_rows: int | None = typer.Option(
        None, "--max-rows", min=1, help="Read at most this many texts (default: the eval block's max_rows, else 10000)."
    ),
    batch_size: int = typer.Option(256, "--batch-size", help="Encoding batch size."),
    max_length: int | None = typer.Option(None, "--max-length", min=1, help="Tokens per text (default: the model's)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON instead of a table."),
) -> None:
    """Measure retrieval quality: recall@1/5/10, MAP@R, R-precision, triplet accuracy (and, on triplet
    data, accuracy on the data's own negatives)."""
    quiet_libraries()
    from tripletctl.commands.eval_command import run_eval_command
    from tripletctl.commands.loading import held_out_source

    given = source_options(
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
    )
    try:
        source, rows = held_out_source(checkpoint, given, SOURCE_OPTIONS, max_rows, default_max_rows=10000)
        settings = dict(max_rows=rows, batch_size=batch_size, device=device, as_json=as_json, max_length=max_length)
        run_eval_command(checkpoint, source, console=console, **settings)
    except TripletctlError as error:
        fail(error)


def compare(
    a: Path = typer.Argument(
        ..., metavar="A", help="Model A: a run, phase or checkpoint directory, a model folder or a hub name."
    ),
    b: Path = typer.Argument(..., metavar="B", help="Model B: the same kinds as A; the differences are B - A."),
    data: DataOpt = None,
    format: FormatOpt = None,
    split: SplitOpt = None,
    layout: LayoutOpt = None,
    text_column: TextColumnOpt = None,
    label_column: LabelColumnOpt = None,
    anchor_column: AnchorColumnOpt = None,
    positive_column: PositiveColumnOpt = None,
    negative_column: NegativeColumnOpt = None,
    load_dataset: LoadDatasetOpt = None,
    max_rows: int | None = typer.Option(
        None, "--max-rows", min=1, help="Read at most this many texts (default: A's eval block's max_rows, else 10000)."
    ),
    batch_size: int = typer.Option(256, "--batch-size", help="Encoding batch size."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    resamples: int = typer.Option(2000, "--resamples", help="Bootstrap resamples of the queries (at least 1000)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resamples."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole comparison as JSON instead of a table."),
) -> None:
    """Compare two models on the same held-out rows: recall@1/5/10, MAP@R and R-precision of each,
    B - A with its paired bootstrap 95% interval, and "no detectable difference" where it holds 0.
    Without --data, the rows are A's eval block (A must then be a run or checkpoint)."""
    quiet_libraries()
    from tripletctl.commands.compare_command import run_compare_command
    from tripletctl.commands.loading import held_out_source

    given = source_options(
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
    )
    try:
        source, rows = held_out_source(a, given, SOURCE_OPTIONS, max_rows, default_max_rows=10000)
        run_compare_command(
            a,
            b,
            source,
            max_rows=rows,
            batch_size=batch_size,
            device=device,
            resamples=resamples,
            seed=seed,
            as_json=as_json,
            console=console,
        )
    except TripletctlError as error:
        fail(error)


def inspect_collapse(
    checkpoint: Path = typer.Argument(
        ..., help="A phase checkpoint, a phase directory or a run directory (latest phase)."
    ),
    data: DataOpt = None,
    format: FormatOpt = None,
    split: SplitOpt = None,
    layout: LayoutOpt = None,
    text_column: TextColumnOpt = None,
    label_column: LabelColumnOpt = None,
    anchor_column: AnchorColumnOpt = None,
    positive_column: PositiveColumnOpt = None,
    negative_column: NegativeColumnOpt = None,
    load_dataset: LoadDatasetOpt = None,
    max_rows: int | None = typer.Option(
        None, "--max-rows", min=1, help="Sample size in texts (default: the eval block's max_rows, else 2000)."
    ),
    margin: float | None = typer.Option(
        None,
        "--margin",
        help="Margin to judge against (default: the last phase's margin in the checkpoint's curriculum, else 0.2).",
    ),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="Write d(a,p)/d(a,n) histograms and the singular-value spectrum to this PNG (an existing directory gets collapse.png inside; .png is added to a name without a suffix).",
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Say whether embeddings have collapsed: numbers, a verdict and exit code 0 healthy / 1 at risk / 3 collapsed."""
    quiet_libraries()
    from tripletctl.commands.collapse_command import run_inspect_command
    from tripletctl.commands.loading import held_out_source

    given = source_options(
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
    )
    try:
        source, rows = held_out_source(checkpoint, given, SOURCE_OPTIONS, max_rows, default_max_rows=2000)
        code = run_inspect_command(
            checkpoint, source, max_rows=rows, margin=margin, plot=plot, device=device, as_json=as_json, console=console
        )
    except TripletctlError as error:
        fail(error)
    raise typer.Exit(code=code)


def plot(
    run_dir: Path = typer.Argument(..., help="Run directory (the curriculum's train.output_dir)."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="PNG to write (default RUN_DIR/run.png; an existing directory gets run.png inside; .png is added to a name without a suffix).",
    ),
) -> None:
    """Draw a whole run: mining and batch-hard loss with phase boundaries, active fraction, eval metrics."""
    from tripletctl.evaluation.plots import plot_run

    try:
        written = plot_run(run_dir, out)
    except TripletctlError as error:
        fail(error)
    console.print(f"wrote {written}")


def export(
    checkpoint: Path = typer.Argument(
        ..., help="A phase checkpoint, a phase directory or a run directory (latest phase)."
    ),
    out_dir: Path = typer.Argument(
        ..., help="Directory to write the model folder to (created; must be empty unless --force)."
    ),
    best: bool = typer.Option(
        False, "--best", help="Export the run's best held-out model (train.keep_best) instead of the latest."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the contents of a non-empty OUT_DIR."),
) -> None:
    """Copy only the model folder (no optimizer or stream state), ready for `hf upload`.

    The folder loads with tripletctl, transformers' AutoModel and sentence-transformers'
    SentenceTransformer, and carries a model card (README.md). Written atomically; exit 2 on a
    missing, incomplete or damaged checkpoint, or a non-empty OUT_DIR without --force.
    """
    quiet_libraries()
    from tripletctl.outputs.export import export_model

    try:
        done = export_model(checkpoint, out_dir, best=best, force=force)
    except TripletctlError as error:
        fail(error)
    upgraded = " (re-saved from the previous format)" if done.upgraded else ""
    console.print(
        f"exported {done.source} -> {done.out_dir}: {done.files} files, {done.bytes / 1e6:.1f} MB{upgraded}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"upload: hf upload USER/NAME {done.out_dir}", highlight=False, soft_wrap=True)
