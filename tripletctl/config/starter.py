"""The commented curriculum `tripletctl init` writes: blocks of (key, value, why) and the sized phases
in, YAML text out, each decision with its reason beside it. Pure and torch-free; `load_curriculum`
reads the result like any other file (tests/test_starter.py checks it does, unchanged)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from tripletctl.config.loss_rules import DEFAULT_LOSS
from tripletctl.config.sizing import PhasePlan

COMMENT_COLUMN = 34  # where the reasons start, so they read as a column


class Commented:
    """A value written as a comment: a key the user may want, left out (e.g. `base_model`)."""

    def __init__(self, value: Any):
        self.value = value


Block = Sequence[tuple[str, Any, str]]  # (key, value, why); why "" for none


def scalar(value: Any) -> str:
    """One YAML value on one line (flow style for lists and mappings)."""
    text = yaml.safe_dump([value], default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text[1:-1]


def _line(indent: str, key: str, value: Any, why: str) -> str:
    if isinstance(value, Commented):
        text = f"{indent}# {key}: {scalar(value.value)}"
    else:
        text = f"{indent}{key}: {scalar(value)}"
    if why:
        text = text.ljust(COMMENT_COLUMN - 1) + f" # {why}"
    return text


def _phase(plan: PhasePlan) -> list[str]:
    lines = [f"  # {plan.why}"] if plan.why else []
    keys: list[tuple[str, Any]] = [
        ("name", plan.name),
        ("mining", plan.mining),
        ("batch_size", plan.batch_size),
        ("margin", plan.margin),
        ("steps", plan.steps),
        ("warmup_steps", plan.warmup_steps),
    ]
    if plan.loss != DEFAULT_LOSS:
        keys.insert(2, ("loss", plan.loss))
    if plan.mined_negatives:
        keys.append(("mined_negatives", plan.mined_negatives))
    if plan.until:
        keys.append(("until", plan.until))
    for position, (key, value) in enumerate(keys):
        lines.append(("  - " if position == 0 else "    ") + f"{key}: {scalar(value)}")
    return lines


def render(header: Sequence[str], blocks: dict[str, Block], phases: Sequence[PhasePlan], phases_why: str) -> str:
    """The file: header comments, then model, data, train, phases, eval (blocks in the order given)."""
    out = [f"# {' '.join(line.split())}" if line else "#" for line in header]  # a path's newline stays a comment
    for name, block in blocks.items():
        if name == "eval":
            continue
        out += ["", f"{name}:", *(_line("  ", key, value, why) for key, value, why in block)]
    out += ["", f"# {phases_why}", "phases:"]
    for plan in phases:
        out += _phase(plan)
    if "eval" in blocks:
        out += ["", "eval:", *(_line("  ", key, value, why) for key, value, why in blocks["eval"])]
    return "\n".join(out) + "\n"
