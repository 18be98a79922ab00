"""The command line: a thin Typer layer. Every command parses arguments and calls one function
in the module that owns the concept; no training, mining or evaluation logic lives here. The
training commands are here; the commands on a trained model or run are cli_models.py's, and what
both share (the consoles, `fail`, the held-out source options) is cli_options.py's."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import typer

from tripletctl import __version__, cli_models
from tripletctl.cli_options import PIPE_WIDTH, console, err_console, fail, quiet_libraries
from tripletctl.core.errors import TripletctlError
from tripletctl.core.exit_codes import EXIT_INTERRUPTED, help_table

app = typer.Typer(
    name="tripletctl",
    help=(
        "Train triplet-loss text embedding models from YAML curricula: online mining phase by phase "
        "(the built-in facenet: semi-hard, then InfoNCE over larger batches), evaluate retrieval and detect "
        "embedding collapse. Own data: `tripletctl init --data FILE --model FOLDER`, then `tripletctl train`."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _flags_show_no_type() -> None:
    """Boolean flags take no value: typer 0.2x shows them as `--resume <bool>`, which reads as if
    they wanted one. Their type column stays empty (every other option keeps its type)."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_flags_plain", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich._flags_plain = True
    TyperOption.display_type_rich = display_type_rich


_flags_show_no_type()


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"tripletctl {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    # Decided per invocation, not at import: tests and wrappers swap sys.stdout.
    for output in (console, err_console):
        output.width = PIPE_WIDTH if not output.is_terminal else None  # None: the terminal's own width


OVERRIDES_HELP = "key=value overrides applied on top of the file, e.g. phases.2.steps=500 train.lr=3e-5"


CURRICULUM_HELP = "Curriculum YAML file, or the name of a built-in one (see `tripletctl curricula`)."


def _curriculum_file(argument: Path) -> Path:
    """The file to load for a curriculum argument: a path, else a built-in curriculum's name."""
    from tripletctl.api import curriculum_file

    return curriculum_file(argument)


def _warn(plan) -> None:
    """What a curriculum does that is allowed but costly (a new head on a pretrained sentence model)."""
    from tripletctl.config.model_folder import head_warning

    warning = head_warning(plan.model)
    if warning:
        err_console.print(f"warning: {warning}", highlight=False, soft_wrap=True, markup=False)


TRAIN_HELP = """Run every phase of a curriculum: stream, mine online, step, log, checkpoint.

Writes OUTPUT/run.json and, per phase, OUTPUT/phase-K-NAME/ with checkpoint/, metrics.jsonl and summary.json (OUTPUT is train.output_dir), and OUTPUT/best/ with train.keep_best. On a terminal a progress bar; in a file or pipe one line every train.log_every steps. Under torchrun the batch size is the global batch.

Exit codes:
""" + help_table()


@app.command(help=TRAIN_HELP)
def train(
    curriculum: Path = typer.Argument(..., help=CURRICULUM_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue from the latest checkpoint in the output directory: same phase, step and stream position.",
    ),
    max_steps: int | None = typer.Option(
        None,
        "--max-steps",
        min=1,
        help="Stop (with a checkpoint) after this many steps in this invocation; --resume continues.",
    ),
) -> None:
    from tripletctl.train.interrupt import SECOND_MESSAGE, InterruptedTwice, StopFlag

    plan = None
    with StopFlag() as stop:  # first, before the slow imports: a Ctrl-C during start-up is never lost
        try:
            quiet_libraries()
            from tripletctl.api import load_checked
            from tripletctl.train.run import train as run_training

            path = _curriculum_file(curriculum)
            if path != curriculum:
                console.print(f"built-in curriculum {curriculum}: {path}", soft_wrap=True, highlight=False)
            plan = load_checked(path, overrides or [])  # the local data's columns and classes too
            _warn(plan)
            code = run_training(
                plan,
                resume=resume,
                console=console,
                max_steps=max_steps,
                stop=stop,
                command=[str(curriculum), *(overrides or [])],
            )
        except TripletctlError as error:
            fail(error)
        except KeyboardInterrupt as interrupt:
            stop.settled()
            said = SECOND_MESSAGE if isinstance(interrupt, InterruptedTwice) else "interrupted"
            if plan is not None:  # the same hint as every other stop: --resume, or the command again
                from tripletctl.train.report import next_command

                said += f"; {next_command(Path(plan.train.output_dir), [str(curriculum), *(overrides or [])])}"
            err_console.print(said, highlight=False, soft_wrap=True, markup=False)
            raise typer.Exit(code=EXIT_INTERRUPTED) from None
    raise typer.Exit(code=code or 0)


@app.command()
def validate(
    curriculum: Path = typer.Argument(..., help=CURRICULUM_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    as_json: bool = typer.Option(
        False, "--json", help="Print the fully resolved curriculum (every key, paths resolved) as JSON."
    ),
) -> None:
    """Check a curriculum (and overrides) and print the plan as a table, or every error found. Local
    data is read too (its columns, and the first rows: do the classes fill the batches?)."""
    from tripletctl.config.blocks import curriculum_to_dict
    from tripletctl.config.plan import data_lines, plan_table
    from tripletctl.config.validate import load_curriculum
    from tripletctl.data.header import FactsReader

    reader = FactsReader()
    try:
        plan = load_curriculum(_curriculum_file(curriculum), overrides or [], read_data=reader)
    except TripletctlError as error:
        fail(error)
    _warn(plan)
    if as_json:
        print(json.dumps(curriculum_to_dict(plan), indent=2))
    else:
        console.print(plan_table(plan), crop=False)  # caption lines are never cut (see plan_table)
        for line in data_lines(plan, reader.facts):
            console.print(line, highlight=False, soft_wrap=True, markup=False)


curricula_app = typer.Typer(help="The built-in curricula: list them, or copy one to edit.", no_args_is_help=False)
app.add_typer(curricula_app, name="curricula")


@curricula_app.callback(invoke_without_command=True)
def curricula(context: typer.Context) -> None:
    """List the built-in curricula, one line each (run one with `tripletctl train NAME`)."""
    from tripletctl.config.builtin import describe, names

    if context.invoked_subcommand is None:
        width = max(len(name) for name in names())
        for name in names():
            print(f"{name:<{width}}  {describe(name)}")


def _builtin_names(prefix: str) -> list[str]:
    from tripletctl.config.builtin import names

    return [name for name in names() if name.startswith(prefix)]


@curricula_app.command(name="copy")
def curricula_copy(
    name: str = typer.Argument(
        ...,
        help="A built-in curriculum (see `tripletctl curricula`).",
        autocompletion=lambda incomplete: _builtin_names(incomplete),
    ),
    dest: Path = typer.Argument(Path("."), help="Directory to write NAME.yaml (and its NAME/ assets) into."),
) -> None:
    """Write an editable copy of a built-in curriculum, with its assets; its ./ paths keep working."""
    from tripletctl.config.builtin import copy

    try:
        written = copy(name, dest)
    except TripletctlError as error:
        fail(error)
    for path in written:
        console.print(f"wrote {path}", soft_wrap=True, highlight=False)
    console.print(f"train it with: tripletctl train {written[0]}", soft_wrap=True, highlight=False)


INIT_HELP = """Write a curriculum sized to your data and model; `tripletctl train OUT` is the next command.

Reads a sample of --data (streamed, at most --sample-rows rows), counts its classes and rows per class, holds out whole classes (with few classes: a share of every class's rows) as the eval block where the budget makes more than 4 passes (or with --hold-out), written as files beside OUT, and sizes the phases, batches, steps (from --budget), learning rate and intervals to them (docs/init.md). Prints what it found and decided; exit 2 on bad input."""


@app.command(help=INIT_HELP)
def init(
    data: str = typer.Option(..., "--data", help="Hub dataset name, local file, directory or glob."),
    model: str = typer.Option(..., "--model", help="A local model folder or a hub name."),
    text_column: str | None = typer.Option(None, "--text-column", help="Text column (default: text, else guessed)."),
    label_column: str | None = typer.Option(
        None, "--label-column", help="Class column (default: label, else guessed)."
    ),
    format: str | None = typer.Option(None, "--format", help="json | parquet | csv (default: the file extension)."),
    split: str | None = typer.Option(None, "--split", help="The split to read (default: train)."),
    load_dataset: list[str] | None = typer.Option(
        None,
        "--load-dataset",
        help="KEY=VALUE passed unchanged to datasets.load_dataset; repeatable.",
        show_default=False,
    ),
    heldout: str | None = typer.Option(
        None, "--heldout", help="A held-out source (same columns) instead of holding out part of --data."
    ),
    hold_out: bool | None = typer.Option(
        None, "--hold-out/--no-hold-out", help="Hold part of --data out as the eval block (default: past 4 passes)."
    ),
    budget: int | None = typer.Option(
        None, "--budget", min=1, help="Training samples (texts embedded in batches); default: 4 passes over the rows."
    ),
    gpu: bool | None = typer.Option(
        None, "--gpu/--cpu", help="Size for a CUDA GPU or for the CPU (default: a GPU when one is available)."
    ),
    sample_rows: int | None = typer.Option(None, "--sample-rows", min=1, help="Rows read at most (default 50000)."),
    out: Path = typer.Option(
        Path("curriculum.yaml"), "--out", "-o", help="The curriculum to write; OUT_STEM-data/ beside it: data files."
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT and its data files if they exist."),
) -> None:
    quiet_libraries()
    from tripletctl.api import init as write_curriculum

    options = {"text_column": text_column, "label_column": label_column, "format": format, "split": split}
    options["load_dataset"] = load_dataset
    device = None if gpu is None else ("cuda" if gpu else "cpu")
    typed = shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["init"] else "init"
    try:
        done = write_curriculum(
            data,
            model,
            out=out,
            budget=budget,
            device=device,
            heldout=heldout,
            hold_out=hold_out,
            sample_rows=sample_rows,
            force=force,
            command=f"tripletctl {typed}",
            **{key: value for key, value in options.items() if value},
        )
    except TripletctlError as error:
        fail(error)
    _print_init(done, out)


def _print_init(done, out: Path) -> None:
    """What `init` found and decided, the files it wrote, and the next two commands."""
    for line in (*done.lines, *(f"wrote {path}" for path in done.files)):
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    console.print(f"next: tripletctl validate {shlex.quote(str(out))}   # the plan", highlight=False, soft_wrap=True)
    console.print(f"      tripletctl train {shlex.quote(str(out))}", highlight=False, soft_wrap=True)


# The commands on a trained model or run (cli_models.py), after the training commands in `--help`.
app.command(name="eval")(cli_models.evaluate)
app.command()(cli_models.compare)
app.command(name="inspect-collapse")(cli_models.inspect_collapse)
app.command()(cli_models.plot)
app.command()(cli_models.export)


def main() -> None:
    """Console-script entry point; the machine's faults that escape a command are one line there
    (cli_faults.py), anything else keeps its traceback."""
    from tripletctl.cli_faults import run_guarded

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_guarded(app, err_console)


if __name__ == "__main__":
    sys.exit(main())
