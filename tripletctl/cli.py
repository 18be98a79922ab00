"""The command line: a thin Typer layer. Every command parses arguments and calls one function
in the module that owns the concept; no training, mining or evaluation logic lives here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from tripletctl.errors import TripletctlError

app = typer.Typer(
    name="tripletctl",
    help=(
        "Train triplet-loss text embedding models from YAML curricula "
        "(semi-hard -> hard-negative -> batch-hard, batches 500 -> 1000 -> 2000), "
        "evaluate retrieval and detect embedding collapse."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _fail(error: TripletctlError) -> None:
    """Print every problem on its own line (markup off: messages quote user text) and exit 2."""
    problems = getattr(error, "problems", None) or [str(error)]
    if len(problems) > 1:
        err_console.print(f"[bold red]error:[/] {len(problems)} problems")
    for problem in problems:
        err_console.print("[bold red]error:[/] ", end="")
        err_console.print(problem, highlight=False, soft_wrap=True, markup=False)
    raise typer.Exit(code=error.exit_code)


OVERRIDES_HELP = "key=value overrides applied on top of the file, e.g. phases.2.steps=500 train.lr=3e-5"


@app.command()
def train(
    curriculum: Path = typer.Argument(..., help="Curriculum YAML file."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in the output directory: same phase, step and stream position."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop (with a checkpoint) after this many steps in this invocation; --resume continues."),
) -> None:
    """Run every phase of a curriculum: stream, mine online, step, log, checkpoint.

    Writes OUTPUT/run.json and, per phase, OUTPUT/phase-K-NAME/ with checkpoint/, metrics.jsonl and
    summary.json (OUTPUT is train.output_dir). Exit codes: 0 done, 1 stopped by the collapse
    watchdog (on_collapse: stop), 2 bad input or an environment fault (disk full, read-only
    directory), 5 a tokenizer worker process died (checkpoint written: --resume continues),
    130 interrupted: the first Ctrl-C/SIGTERM stops after the step with a checkpoint, a second
    one stops at once without. Under torchrun the batch size is the global batch.
    """
    from tripletctl.interrupt import SECOND_MESSAGE, InterruptedTwice, StopFlag

    with StopFlag() as stop:  # first, before the slow imports: a Ctrl-C during start-up is never lost
        try:
            from tripletctl.curriculum import load_curriculum
            from tripletctl.runner import train as run_training

            plan = load_curriculum(curriculum, overrides or [])
            code = run_training(plan, resume=resume, console=console, max_steps=max_steps, stop=stop)
        except TripletctlError as error:
            _fail(error)
        except KeyboardInterrupt as interrupt:
            stop.settled()
            err_console.print(SECOND_MESSAGE if isinstance(interrupt, InterruptedTwice) else "interrupted",
                              highlight=False)
            raise typer.Exit(code=130) from None
    raise typer.Exit(code=code or 0)


@app.command()
def validate(
    curriculum: Path = typer.Argument(..., help="Curriculum YAML file."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
) -> None:
    """Check a curriculum (and overrides) and print the plan as a table, or every error found."""
    from tripletctl.curriculum import load_curriculum, plan_table

    try:
        plan = load_curriculum(curriculum, overrides or [])
    except TripletctlError as error:
        _fail(error)
    console.print(plan_table(plan))


@app.command(name="eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A phase checkpoint, a phase directory or a run directory (latest phase)."),
    data: str = typer.Option(..., "--data", help="Held-out labelled source: hub dataset name, local file, directory or glob."),
    format: Optional[str] = typer.Option(None, "--format", help="json | parquet | csv | text (default: from the file extension)."),
    split: str = typer.Option("train", "--split", help="Split to read."),
    text_column: str = typer.Option("text", "--text-column"),
    label_column: str = typer.Option("label", "--label-column"),
    max_rows: int = typer.Option(10000, "--max-rows", help="Read at most this many rows."),
    batch_size: int = typer.Option(256, "--batch-size", help="Encoding batch size."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON instead of a table."),
) -> None:
    """Measure retrieval quality: recall@1/5/10, MAP@R, R-precision, triplet accuracy."""
    from tripletctl.evaluation import HeldOut, run_eval_command

    held_out = HeldOut(data, format, split, text_column, label_column, max_rows)
    try:
        run_eval_command(checkpoint, held_out, batch_size=batch_size, device=device, as_json=as_json,
                         console=console)
    except TripletctlError as error:
        _fail(error)


@app.command(name="inspect-collapse")
def inspect_collapse(
    checkpoint: Path = typer.Argument(..., help="A phase checkpoint, a phase directory or a run directory (latest phase)."),
    data: str = typer.Option(..., "--data", help="Labelled source to sample: hub dataset name, local file, directory or glob."),
    format: Optional[str] = typer.Option(None, "--format", help="json | parquet | csv | text (default: from the file extension)."),
    split: str = typer.Option("train", "--split"),
    text_column: str = typer.Option("text", "--text-column"),
    label_column: str = typer.Option("label", "--label-column"),
    max_rows: int = typer.Option(2000, "--max-rows", help="Sample size."),
    margin: Optional[float] = typer.Option(None, "--margin", help="Margin to judge against (default: the last phase's margin in the checkpoint's curriculum, else 0.2)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write d(a,p)/d(a,n) histograms and the singular-value spectrum to this PNG."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Say whether embeddings have collapsed: numbers, a verdict and exit code 0 healthy / 1 at risk / 3 collapsed."""
    from tripletctl.collapse import run_inspect_command
    from tripletctl.evaluation import HeldOut

    held_out = HeldOut(data, format, split, text_column, label_column, max_rows)
    try:
        code = run_inspect_command(checkpoint, held_out, margin=margin, plot=plot, device=device,
                                   as_json=as_json, console=console)
    except TripletctlError as error:
        _fail(error)
    raise typer.Exit(code=code)


@app.command()
def plot(
    run_dir: Path = typer.Argument(..., help="Run directory (the curriculum's train.output_dir)."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default RUN_DIR/run.png)."),
) -> None:
    """Draw a whole run: mining and batch-hard loss with phase boundaries, active fraction, eval metrics."""
    from tripletctl.plots import plot_run

    try:
        written = plot_run(run_dir, out)
    except TripletctlError as error:
        _fail(error)
    console.print(f"wrote {written}")


def _quiet_libraries() -> None:
    """Our own progress bars and messages replace the libraries' per-file ones."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


def main() -> None:
    """Console-script entry point."""
    _quiet_libraries()
    app()


if __name__ == "__main__":
    sys.exit(main())
