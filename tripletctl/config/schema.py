"""How a curriculum key is declared: once, as the dataclass field that holds its value.

`key(...)` is `dataclasses.field` plus what the loader needs to know about the key: the check that
converts and validates a value as YAML (or an override) typed it, whether the key is required,
whether it is a path (resolved against the curriculum's directory) and a line of help. blocks.py
derives the keys each block accepts, the required keys, the path keys and the defaults from the
fields (`checks`, `required`, `paths`, `defaults`) and block_checks.py checks a file against them, so
adding a key is one line in one dataclass. The value checks shared by every block live here too;
until.py declares the `until:` keys with them. Pure Python: no torch, nothing slow to import.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Sequence
from typing import Any

Check = Callable[[Any, "str | None"], Any]
"""Takes the value (as YAML typed it) and, for a key set by an override, the raw text after '=';
returns the value converted to the key's type or raises Invalid."""


class Invalid(Exception):
    """A value that does not fit its key: what was expected, plus an optional did-you-mean hint."""

    def __init__(self, expected: str, hint: str = ""):
        super().__init__(expected)
        self.expected = expected
        self.hint = hint


def key(
    default: Any = dataclasses.MISSING,
    *,
    check: Check | None,
    help: str = "",
    required: bool = False,
    path: bool = False,
    default_factory: Any = dataclasses.MISSING,
    **metadata: Any,
) -> Any:
    """A dataclass field that is also a curriculum key. `check` None: the holder checks it (see
    conditions.Plateau.metric); extra `metadata` is for the loader (e.g. `train=` on phase keys)."""
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        metadata={"check": check, "help": help, "required": required, "path": path, **metadata},
    )


def checks(cls: type) -> dict[str, Check | None]:
    """The keys a block accepts, in field order, each with its check."""
    return {f.name: f.metadata["check"] for f in dataclasses.fields(cls) if "check" in f.metadata}


def required(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("required"))


def paths(cls: type) -> tuple[str, ...]:
    """Keys whose `./x` / `../x` values are local paths, resolved against the curriculum's directory."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("path"))


def home_paths(cls: type) -> tuple[str, ...]:
    """Keys whose values may be local paths: `~` and `~user` are expanded in every one of them, the
    same way (`path` keys, and `local_path` keys such as train.output_dir, relative to the current
    directory)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("path") or f.metadata.get("local_path"))


MAX_NAME_BYTES = 255  # one path component, on every common file system


def local_path() -> Check:
    """A non-empty string whose every component fits a file system (at most 255 bytes): a longer
    one is refused before the run starts, not as `File name too long` half-way."""
    as_text = text()

    def check(value: Any, raw: str | None) -> str | None:
        value = as_text(value, raw)
        longest = max((part for part in value.split("/")), key=lambda part: len(part.encode()), default="")
        if len(longest.encode()) > MAX_NAME_BYTES:
            raise Invalid(
                f"a path whose components have at most {MAX_NAME_BYTES} bytes (one has {len(longest.encode())})"
            )
        return value

    return check


def defaults(cls: type) -> dict[str, Any]:
    values = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return values


# --------------------------------------------------------------------------------------------
# Value checks.


def is_scalar(value: Any) -> bool:
    return value is not None and not isinstance(value, (str, list, dict))


def did_you_mean(value: Any, options: Sequence[str]) -> str:
    if not isinstance(value, str):
        return ""
    matches = difflib.get_close_matches(value.lower(), options, n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def integer(minimum: int = 1, maximum: int | None = None) -> Check:
    expected = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    if maximum is not None:
        expected = f"an integer from {minimum} to {maximum}"

    def check(value: Any, raw: str | None) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            raise Invalid(expected)
        return value

    return check


def number(positive: bool = True) -> Check:
    expected = "a positive number" if positive else "a non-negative number"

    def check(value: Any, raw: str | None) -> float:
        if isinstance(value, str):  # PyYAML reads `3e-5` (no dot) as a string, so parse it here
            try:
                value = float(value)
            except ValueError:
                raise Invalid(expected) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Invalid(expected)
        if value < 0 or (positive and value == 0):
            raise Invalid(expected)
        return float(value)

    return check


def boolean(value: Any, raw: str | None) -> bool:
    if not isinstance(value, bool):
        raise Invalid("true or false")
    return value


def text(optional: bool = False) -> Check:
    expected = "a non-empty string or null" if optional else "a non-empty string"

    def check(value: Any, raw: str | None) -> str | None:
        if value is None and optional:
            return None
        if raw is not None and is_scalar(value):  # `data.split=2020` on the command line means the text
            value = raw
        if not isinstance(value, str) or not value.strip():
            raise Invalid(expected)
        return value

    return check


def choice(options: tuple[str, ...], optional: bool = False) -> Check:
    expected = "one of " + ", ".join(options) + (" or null" if optional else "")

    def check(value: Any, raw: str | None) -> str | None:
        if value is None and optional:
            return None
        if isinstance(value, str) and value in options:
            return value
        raise Invalid(expected, did_you_mean(value, options))

    return check


def optional(check: Check) -> Check:
    def optional(value: Any, raw: str | None) -> Any:
        return None if value is None else check(value, raw)

    return optional


def fraction(value: Any, raw: str | None) -> float:
    value = number()(value, raw)
    if value > 1:
        raise Invalid("a number in (0, 1]")
    return value


def relative_delta(value: Any, raw: str | None) -> float:
    try:
        value = number(positive=False)(value, raw)
    except Invalid:
        raise Invalid("a relative improvement in [0, 1), e.g. 0.01 for 1%") from None
    if value >= 1:
        raise Invalid("a relative improvement in [0, 1), e.g. 0.01 for 1%")
    return value


def mapping(expected: str) -> Check:
    """A mapping (or null) whose own keys are checked later, by the code that knows their context."""

    def check(value: Any, raw: str | None) -> dict | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise Invalid(expected)
        return dict(value)

    return check


def bool_or_auto(value: Any, raw: str | None) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    raise Invalid("true, false or 'auto'")


def int_or_auto(value: Any, raw: str | None) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise Invalid("a positive integer or 'auto'")


def int_or_auto_or_null(value: Any, raw: str | None) -> int | str | None:
    if value is None:
        return None
    return int_or_auto(value, raw)
