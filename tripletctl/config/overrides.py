"""`key=value` overrides, applied to the parsed YAML tree before validation, so an overridden value is
checked exactly like one written in the file. Each records where it came from, for messages and for
resolving relative paths against the current directory instead of the file's."""

from __future__ import annotations

import difflib
from typing import Any

import yaml

from tripletctl.config.blocks import BLOCK_KEYS, PHASE_KEYS, TOP_KEYS, UNTIL_KEYS
from tripletctl.config.problems import Override, Problems, phase_label, show_value, unknown_key
from tripletctl.config.yaml_io import YamlTooBig, safe_yaml_load


def parse_override_value(text: str) -> Any:
    try:
        return safe_yaml_load(text)
    except YamlTooBig:
        raise
    except yaml.YAMLError:  # e.g. `*.parquet` reads as a YAML alias: it is meant as plain text
        return text


def _dotted_keys(parts: list[str]) -> list[str]:
    """The real keys an override of this many parts could have meant, spelled in full (`train.seed`,
    `phases.1.steps`), so a suggestion is always a key that exists."""
    if len(parts) == 1:
        return list(TOP_KEYS)
    keys = [f"{block}.{name}" for block, names in BLOCK_KEYS.items() for name in names]
    if len(parts) > 2:
        keys += [f"phases.{parts[1]}.{name}" for name in PHASE_KEYS]
        keys += [f"phases.{parts[1]}.until.{name}" for name in UNTIL_KEYS]
    return keys


def apply_override(tree: dict, text: str, origins: dict[tuple, Override], problems: Problems) -> None:
    key, sep, value_text = text.partition("=")
    key = key.strip()
    override = Override(text, value_text.strip())
    if not sep or not key:
        problems.add("expected key=value, e.g. train.lr=3e-5", override)
        return
    try:
        value = parse_override_value(value_text)
    except YamlTooBig as error:
        problems.add(f"the value is not usable YAML: {error}", override)
        return
    parts = key.split(".")
    top = parts[0]
    if top not in TOP_KEYS:
        matches = difflib.get_close_matches(key, _dotted_keys(parts), n=1, cutoff=0.6)
        hint = f" (did you mean '{matches[0]}'?)" if matches else ""
        problems.add(f"unknown key '{key}'{hint}", override)
        return
    if len(parts) == 1 and top == "phases":  # docs: overrides change phases, never add or remove them
        count = len(tree["phases"]) if isinstance(tree.get("phases"), list) else 0
        if not isinstance(value, list) or len(value) != count:
            given = f"{len(value)} phases" if isinstance(value, list) else show_value(value)
            problems.add(
                f"overrides cannot add or remove phases: the file has {count}, the override gives "
                f"{given}; change a phase with phases.N.KEY=VALUE",
                override,
            )
            return
    if len(parts) == 1:  # a whole block, e.g. `eval={source: ./heldout.jsonl}`
        tree[top] = value
        origins[(top,)] = override
        return
    if top == "phases":
        _apply_phase_override(tree, parts, value, override, origins, problems)
        return
    name = parts[1]
    if name not in BLOCK_KEYS[top]:
        problems.add(unknown_key(name, list(BLOCK_KEYS[top]), f"{top}."), override)
        return
    if len(parts) > 2 and name != "load_dataset":
        problems.add(f"'{top}.{name}' has no sub-keys", override)
        return
    if tree.get(top) is None:  # overrides may create a block the file leaves out
        tree[top] = {}
    target = tree[top]
    for part in parts[1:-1]:  # only data.load_dataset.KEY / eval.load_dataset.KEY go deeper
        if not isinstance(target, dict):
            break
        if not isinstance(target.get(part), dict):
            target[part] = {}
        target = target[part]
    if not isinstance(target, dict):
        problems.add(f"cannot set '{key}': {top} is not a mapping in the file", override)
        return
    target[parts[-1]] = value
    origins[(top, name)] = override


def _apply_phase_override(
    tree: dict, parts: list[str], value: Any, override: Override, origins: dict, problems: Problems
) -> None:
    phases = tree.get("phases")
    if not isinstance(phases, list) or not phases:
        problems.add(f"cannot set '{'.'.join(parts)}': the file has no list of phases", override)
        return
    last = len(phases) - 1
    if not parts[1].isdigit():
        problems.add(f"'{parts[1]}' is not a phase index: use phases.N.KEY with N from 0 to {last}", override)
        return
    index = int(parts[1])
    if index > last:
        problems.add(f"phases[{index}] does not exist: the curriculum has {len(phases)} phases (0 to {last})", override)
        return
    label = phase_label(index, phases[index])
    if len(parts) != 3 and not (len(parts) in (4, 5) and parts[2] == "until"):  # until.KEY, until.plateau.KEY
        problems.add(f"{label}: expected phases.{index}.KEY, e.g. phases.{index}.steps=500", override)
        return
    name = parts[2]
    if name not in PHASE_KEYS:
        problems.add(f"{label}: {unknown_key(name, list(PHASE_KEYS))}", override)
        return
    if not isinstance(phases[index], dict):
        problems.add(f"{label}: cannot set '{name}': the phase is not a mapping in the file", override)
        return
    target = phases[index]
    for part in parts[2:-1]:  # the until block (and its plateau mappings) may be created by the override
        if not isinstance(target.get(part), dict):
            target[part] = {}
        target = target[part]
    target[parts[-1]] = value
    origins[("phases", index, *parts[2:])] = override
