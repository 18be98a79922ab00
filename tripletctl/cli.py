"""The command line: a thin Typer layer. Every command parses arguments and calls one function
in the module that owns the concept; no training, mining or evaluation logic lives here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from tripletctl import __version__
from tripletctl.errors import TripletctlError

app = typer.Typer(
    name="tripletctl",
    help=(
        "Train triplet-loss text embedding models from YAML curricula "
        "(semi-hard -> hard-negative -> batch-hard, batches 500 -> 1000 -> 2000), "
        "evaluate retrieval and detect embedding collapse."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
PIPE_WIDTH = 1000  # stdout to a file or pipe: tables take the width they need, nothing wraps mid-word


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"tripletctl {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    # Decided per invocation, not at import: tests and wrappers swap sys.stdout.
    for output in (console, err_console):
        output.width = PIPE_WIDTH if not output.is_terminal else None  # None: the terminal's own width


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


CURRICULUM_HELP = "Curriculum YAML file, or the name of a built-in one (see `tripletctl curricula`)."


def _curriculum_file(argument: Path) -> Path:
    """The file to load for a curriculum argument: a path, else a built-in curriculum's name."""
    from tripletctl.builtin_curricula import names, resolve

    path, builtin = resolve(argument)
    if not builtin and not path.exists() and "/" not in str(argument) and not str(argument).endswith((".yaml", ".yml")):
        raise TripletctlError(f"{argument}: no such file, and no built-in curriculum of that name "
                              f"(built-in: {', '.join(names())})")
    return path


@app.command()
def train(
    curriculum: Path = typer.Argument(..., help=CURRICULUM_HELP),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in the output directory: same phase, step and stream position."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop (with a checkpoint) after this many steps in this invocation; --resume continues."),
) -> None:
    """Run every phase of a curriculum: stream, mine online, step, log, checkpoint.

    Writes OUTPUT/run.json and, per phase, OUTPUT/phase-K-NAME/ with checkpoint/, metrics.jsonl and summary.json (OUTPUT is train.output_dir). On a terminal a progress bar; in a file or pipe one line every train.log_every steps. Under torchrun the batch size is the global batch.

    Exit codes:
    0    done, or paused by --max-steps (continue with --resume)
    1    unexpected crash (a bug: please report it)
    2    bad input, damaged file or environment fault, reported before any work where possible
    3    stopped by the collapse watchdog (on_collapse: stop), after a checkpoint
    4    stopped on a non-finite loss or gradient
    5    a tokenizer worker died (resumable with --resume)
    130  interrupted by Ctrl-C / SIGTERM, after a checkpoint (continue with --resume)
    """
    from tripletctl.interrupt import SECOND_MESSAGE, InterruptedTwice, StopFlag

    with StopFlag() as stop:  # first, before the slow imports: a Ctrl-C during start-up is never lost
        try:
            from tripletctl.curriculum import load_curriculum
            from tripletctl.runner import train as run_training

            path = _curriculum_file(curriculum)
            if path != curriculum:
                console.print(f"built-in curriculum {curriculum}: {path}", soft_wrap=True, highlight=False)
            plan = load_curriculum(path, overrides or [])
            code = run_training(plan, resume=resume, console=console, max_steps=max_steps, stop=stop,
                                command=[str(curriculum), *(overrides or [])])
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
    curriculum: Path = typer.Argument(..., help=CURRICULUM_HELP),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the fully resolved curriculum (every key, paths resolved) as JSON."),
) -> None:
    """Check a curriculum (and overrides) and print the plan as a table, or every error found."""
    from tripletctl.curriculum import curriculum_to_dict, load_curriculum, plan_table

    try:
        plan = load_curriculum(_curriculum_file(curriculum), overrides or [])
    except TripletctlError as error:
        _fail(error)
    if as_json:
        print(json.dumps(curriculum_to_dict(plan), indent=2))
    else:
        console.print(plan_table(plan), crop=False)  # caption lines are never cut (see plan_table)


curricula_app = typer.Typer(help="The built-in curricula: list them, or copy one to edit.", no_args_is_help=False)
app.add_typer(curricula_app, name="curricula")


@curricula_app.callback(invoke_without_command=True)
def curricula(context: typer.Context) -> None:
    """List the built-in curricula, one line each (run one with `tripletctl train NAME`)."""
    from tripletctl.builtin_curricula import describe, names

    if context.invoked_subcommand is None:
        width = max(len(name) for name in names())
        for name in names():
            print(f"{name:<{width}}  {describe(name)}")


def _builtin_names(prefix: str) -> list[str]:
    from tripletctl.builtin_curricula import names

    return [name for name in names() if name.startswith(prefix)]


@curricula_app.command(name="copy")
def curricula_copy(
    name: str = typer.Argument(..., help="A built-in curriculum (see `tripletctl curricula`).",
                               autocompletion=lambda incomplete: _builtin_names(incomplete)),
    dest: Path = typer.Argument(Path("."), help="Directory to write NAME.yaml (and its NAME/ assets) into."),
) -> None:
    """Write an editable copy of a built-in curriculum, with its assets; its ./ paths keep working."""
    from tripletctl.builtin_curricula import copy

    try:
        written = copy(name, dest)
    except TripletctlError as error:
        _fail(error)
    for path in written:
        console.print(f"wrote {path}", soft_wrap=True, highlight=False)
    console.print(f"train it with: tripletctl train {written[0]}", soft_wrap=True, highlight=False)


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
