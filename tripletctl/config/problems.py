"""How curriculum problems are collected and worded: the file, the override a value came from, the
phase label and a did-you-mean for unknown keys. Shared by overrides.py and the checks (validate.py, block_checks.py, phase_checks.py)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tripletctl.config import schema
from tripletctl.config.blocks import check_phase_name


@dataclass(frozen=True)
class Override:
    text: str  # as typed, for messages
    value_text: str  # the part after '=', for keys whose type is a string


class Problems:
    """Every problem found so far, each prefixed with the file (and the override it came from)."""

    def __init__(self, path: str):
        self.path = path
        self.messages: list[str] = []

    def add(self, message: str, override: Override | None = None) -> None:
        origin = f"override '{override.text}': " if override else ""
        self.messages.append(f"{self.path}: {origin}{message}")


def show_value(value: Any) -> str:
    """A value as the user wrote it, short enough for a one-line message."""
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif value is None:
        shown = "null"
    else:
        shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def unknown_key(key: str, options: Sequence[str], qualifier: str = "") -> str:
    matches = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    hint = f" (did you mean '{qualifier}{matches[0]}'?)" if matches else ""
    return f"unknown key '{qualifier}{key}'{hint}"


def phase_label(index: int, raw_phase: Any) -> str:
    """`phases[2] (hard)`; an invalid name (too long, control characters...) is left out."""
    name = raw_phase.get("name") if isinstance(raw_phase, dict) else None
    try:
        return f"phases[{index}] ({check_phase_name(name, None)})"
    except schema.Invalid:
        return f"phases[{index}]"


def origin_of(origins: dict[tuple, Override], key_path: tuple) -> Override | None:
    """The override that set this key (or a block containing it), if any."""
    for length in range(len(key_path), 0, -1):
        if key_path[:length] in origins:
            return origins[key_path[:length]]
    return None
