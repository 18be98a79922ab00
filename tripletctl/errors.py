"""Errors that mean "bad input": the CLI turns them into a message and exit code 2."""

from __future__ import annotations


class TripletctlError(Exception):
    """Base class for user-facing errors (bad curriculum, bad data source, bad checkpoint)."""

    exit_code = 2


class ConfigError(TripletctlError):
    """Every problem found in a curriculum and its overrides, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class DataError(TripletctlError):
    """A data source that cannot be used: unreachable, missing column, no usable rows."""


class CheckpointError(TripletctlError):
    """A checkpoint path that does not hold a usable checkpoint."""
