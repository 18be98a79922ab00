"""What `train` prints when it ends or is interrupted: the closing line with the exact command to
continue, the held-out table (untrained against trained), where the best model is and what to run next."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tripletctl.config.blocks import Curriculum
from tripletctl.config.until import EVAL_METRICS
from tripletctl.core.exit_codes import EXIT_COLLAPSE_STOP, EXIT_DONE, EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_WORKER_DIED
from tripletctl.core.files import FileRefused
from tripletctl.core.jsonio import read_json
from tripletctl.core.launcher import command_line
from tripletctl.outputs.checkpoint_find import latest_checkpoint


def train_command(command: list[str], resume: bool) -> str:
    """The command as typed (curriculum and overrides), to run again: the one builder of every hint."""
    return command_line(["train", *command, *(["--resume"] if resume else [])])  # torchrun ... under torchrun


def next_command(output: Path, command: list[str]) -> str:
    """`continue with ... --resume` when the output directory holds a checkpoint, else `start again with ...`."""
    if latest_checkpoint(output) is not None:
        return f"continue with `{train_command(command, resume=True)}`"
    return f"start again with `{train_command(command, resume=False)}`"


def interrupted_during_start_up(
    console: Console, curriculum: Curriculum, previous: Path | None, command: list[str]
) -> int:
    hint = next_command(Path(curriculum.train.output_dir), command)
    if previous is not None:
        text = f"nothing new to save, {previous} is unchanged; {hint}"
    else:
        text = f"nothing was trained, nothing to save; {hint}"
    print_line(console, "bold", "interrupted during start-up", text)
    return EXIT_INTERRUPTED


def print_line(console: Console, style: str, label: str, text: str) -> None:
    """A styled label and a message kept on one line (paths in it are never read as markup)."""
    console.print(f"[{style}]{label}[/]: ", end="")
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def print_outcome(
    console: Console,
    curriculum: Curriculum,
    status: dict[int, str],
    run_extra: dict,
    exit_code: int,
    command: list[str],
    reason: str | None = None,
) -> None:
    output = Path(curriculum.train.output_dir)
    hint = next_command(output, command)  # --resume, or (nothing saved yet) the same command again
    latest = latest_checkpoint(output)
    where = "nothing to save yet" if latest is None else f"checkpoint {latest} ({_saved_step(latest)})"
    if exit_code == EXIT_INTERRUPTED:
        print_line(console, "bold", "interrupted", f"{where}; {hint}")
    elif exit_code == EXIT_WORKER_DIED:
        print_line(console, "bold red", "stopped", f"{reason}; {where}; {hint}")
    elif exit_code == EXIT_NONFINITE:
        kept = f"the last good checkpoint is kept ({where})" if latest else "nothing was saved"
        print_line(console, "bold red", "stopped", f"{reason}; {kept}; lower train.lr (or clip gradients), then {hint}")
    elif exit_code == EXIT_DONE and [status.get(i) for i in range(len(curriculum.phases))] != ["done"] * len(
        curriculum.phases
    ):
        print_line(console, "bold", "paused by --max-steps", f"{where}; {hint}")
    elif exit_code == EXIT_COLLAPSE_STOP:
        console.print(
            "[bold red]stopped: embeddings collapsed[/] (on_collapse: stop); checkpoint written. "
            f"Inspect with `tripletctl inspect-collapse {output}`"
        )
    untrained, final = run_extra.get("eval_untrained"), run_extra.get("eval_final")
    if untrained and final:
        source = curriculum.eval.source
        name = Path(source).name if isinstance(source, str) else "the eval files"
        title = Text(
            f"held-out retrieval ({untrained.get('rows', '?')} rows of {name})", no_wrap=True, overflow="ignore"
        )
        table = Table(title=title)  # the title is not wrapped at the (narrow) table's width
        table.add_column("metric")
        table.add_column("untrained", justify="right")
        table.add_column("trained", justify="right")
        for key in (*EVAL_METRICS, "given_negative_accuracy"):
            if key in untrained and key in final:
                table.add_row(key, f"{untrained[key]:.4f}", f"{final[key]:.4f}")
        console.print(table)
    console.print(f"run directory: {output}  (phases: {', '.join(f'{i}:{s}' for i, s in sorted(status.items()))})")
    kept = run_extra.get("best")
    if kept:
        console.print(
            f"best model: {output / kept['model']} ({kept['metric']} {kept['value']:.4f} at phase "
            f"{kept['phase']}, step {kept['step']})",
            highlight=False,
        )
    if exit_code == EXIT_DONE and curriculum.eval is not None:
        console.print(
            f"next: tripletctl inspect-collapse {output} --plot collapse.png\n"
            f"      tripletctl plot {output}\n"
            f"      tripletctl export {output}{' --best' if kept else ''} ./my-model   # then: hf upload USER/my-model ./my-model",
            highlight=False,
            soft_wrap=True,
        )


def _saved_step(checkpoint: Path) -> str:
    try:
        state = read_json(checkpoint / "state.json")
        return f"phase {state['phase_index']}, step {state['step']}"
    except (OSError, ValueError, KeyError, TypeError, FileRefused):
        return "?"
