"""The exit codes of `tripletctl train`, declared once: `train --help`, the README table (checked by
tests/test_exit_codes.py) and every place that exits use these."""

from __future__ import annotations

EXIT_DONE = 0
EXIT_CRASH = 1  # Python's own code for an uncaught exception: never set by tripletctl itself
EXIT_BAD_INPUT = 2  # TripletctlError.exit_code
EXIT_COLLAPSE_STOP = 3
EXIT_NONFINITE = 4
EXIT_WORKER_DIED = 5  # WorkerDiedError.exit_code
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C

# What each code means to the user: the README's table, and `train --help` without the backticks.
TRAIN_EXIT_CODES = {
    EXIT_DONE: "done, or paused by `--max-steps` (continue with `--resume`)",
    EXIT_CRASH: "an unexpected crash only (a bug: please report it)",
    EXIT_BAD_INPUT: "bad input, a damaged file or an environment fault (disk full, read-only directory, out of "
    "memory, too many open files, missing model, a tracker named but not installed, an output directory another "
    "run holds or another tool's files fill): one line saying what and where, and what to change",
    EXIT_COLLAPSE_STOP: "stopped by the collapse watchdog (`on_collapse: stop`), after a checkpoint",
    EXIT_NONFINITE: "stopped on a non-finite, diverging or exploding loss, gradient or weights "
    "(`train.on_nonfinite`, `train.divergence_factor`); the last good checkpoint is kept",
    EXIT_WORKER_DIED: "a tokenizer worker died, or under torchrun a peer rank did (one line per surviving rank); "
    "resumable with `--resume`",
    EXIT_INTERRUPTED: "interrupted by Ctrl-C / SIGTERM, after a checkpoint (if a step had begun); the message "
    "repeats the command, overrides included, to `--resume` it (or to start again)",
}


def help_table() -> str:
    """The codes as `train --help` prints them (one per line, aligned)."""
    return "\n".join(f"{code:<5}{meaning.replace('`', '')}" for code, meaning in TRAIN_EXIT_CODES.items())


def markdown_table() -> str:
    """The codes as the README's table (tests/test_exit_codes.py checks the README holds exactly this)."""
    rows = ["| code | meaning |", "|---|---|"] + [
        f"| {code} | {meaning} |" for code, meaning in TRAIN_EXIT_CODES.items()
    ]
    return "\n".join(rows)
