"""One block of a curriculum checked: its keys (unknown ones with a suggestion, required ones, each
value's check declared on its field), paths resolved against the curriculum's directory, and a
source block's layout, format and columns. `source_from_options` builds a source typed on the
command line (`eval --data ...`) with the same checks. Every problem goes into one `Problems`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from tripletctl.config import schema
from tripletctl.config.blocks import (
    BLOCK_KEYS,
    BLOCKS,
    SOURCE_KEYS,
    SourceConfig,
    source_fields,
)
from tripletctl.config.layouts import LAYOUT_OF
from tripletctl.config.overrides import parse_override_value
from tripletctl.config.problems import Override, Problems, origin_of, show_value, unknown_key
from tripletctl.core.errors import ConfigError


def _expand_home(value: Any) -> Any:
    """`~/x` and `~user/x` as the shell would expand them, in a path or in each path of a mapping."""
    if isinstance(value, dict):
        return {label: _expand_home(glob) for label, glob in value.items()}
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def _resolve_path(value: Any, base_dir: str) -> Any:
    """`./x` and `../x` are local paths relative to `base_dir`; anything else (a hub name such as
    `bert-base-uncased` or `org/name`, an absolute path) is left as written."""
    if isinstance(value, dict):
        return {label: _resolve_path(glob, base_dir) for label, glob in value.items()}
    if isinstance(value, str) and (value in (".", "..") or value.startswith(("./", "../"))):
        return os.path.normpath(os.path.join(base_dir, value))
    return value


def check_keys(
    raw: dict,
    checks: dict[str, schema.Check],
    required: Sequence[str],
    *,
    context: str,
    qualifier: str,
    key_path: tuple,
    origins: dict[tuple, Override],
    problems: Problems,
) -> dict[str, Any]:
    """Check one mapping; returns the valid values (keys with problems are left out)."""
    values: dict[str, Any] = {}
    for key, value in raw.items():
        origin = origin_of(origins, (*key_path, key))
        if key not in checks:
            problems.add(f"{context}{unknown_key(str(key), list(checks), qualifier)}", origin)
            continue
        exact = origins.get((*key_path, key))
        try:
            values[key] = checks[key](value, exact.value_text if exact else None)
        except schema.Invalid as invalid:
            problems.add(
                f"{context}{qualifier}{key} must be {invalid.expected}, got {show_value(value)}{invalid.hint}", origin
            )
    for key in required:
        if key not in raw:
            problems.add(f"{context}missing required key '{qualifier}{key}'", origin_of(origins, key_path))
    return values


def check_block(
    tree: dict, block: str, file_dir: str, origins: dict[tuple, Override], problems: Problems
) -> tuple[dict[str, Any], set[str]]:
    """Values of one block with defaults filled in, and the keys whose written value was invalid
    (so rules between keys can skip them instead of piling a second error onto a default)."""
    raw = tree.get(block)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.add(f"{block} must be a mapping of keys, got {show_value(raw)}", origin_of(origins, (block,)))
        return schema.defaults(BLOCKS[block]), set(BLOCK_KEYS[block])
    values = check_keys(
        raw,
        BLOCK_KEYS[block],
        schema.required(BLOCKS[block]),
        context="",
        qualifier=f"{block}.",
        key_path=(block,),
        origins=origins,
        problems=problems,
    )
    for key in schema.home_paths(BLOCKS[block]):
        if key in values:
            values[key] = _expand_home(values[key])
    for key in schema.paths(BLOCKS[block]):
        if key in values:
            base_dir = os.getcwd() if origin_of(origins, (block, key)) else file_dir
            values[key] = _resolve_path(values[key], base_dir)
    invalid = {key for key in raw if key in BLOCK_KEYS[block] and key not in values}
    return {**schema.defaults(BLOCKS[block]), **values}, invalid


def check_source_block(
    block: str, values: dict, origins: dict, problems: Problems, name: Callable[[str], str] | None = None
) -> None:
    """Rules between keys shared by `data`, `eval` and the command line's source options (`name`
    spells a key as the user typed it: `eval.layout`, or `--layout`)."""
    name = name or (lambda key: f"{block}.{key}")
    source, fmt = values.get("source"), values.get("format")
    if isinstance(source, dict) and fmt is None:  # a {label: glob} mapping can only be plain text files
        values["format"] = fmt = "text"
    if isinstance(source, dict) and fmt != "text":
        problems.add(
            f"{name('source')} is a {{label: glob}} mapping, which needs {name('format')}: text, got {show_value(fmt)}",
            origin_of(origins, (block, "format")) or origin_of(origins, (block, "source")),
        )
    if isinstance(source, str) and fmt == "text":
        problems.add(
            f"{name('source')} must be a {{label: glob}} mapping when {name('format')} is text "
            f"(plain text files carry no labels), got {show_value(source)}",
            origin_of(origins, (block, "source")),
        )
    layout = values.get("layout")
    grouped = layout in LAYOUT_OF and LAYOUT_OF[layout].grouped
    if fmt == "text" and grouped:
        problems.add(
            f"{name('layout')} must be labelled when {name('format')} is text, got '{layout}'",
            origin_of(origins, (block, "layout")),
        )
    if grouped:
        keys = LAYOUT_OF[layout].column_keys
        names = LAYOUT_OF[layout].columns(values)
        repeated = sorted({n for n in names if n is not None and names.count(n) > 1})
        if repeated:
            problems.add(
                f"the {layout} columns must be distinct, but {', '.join(map(repr, repeated))} is named "
                f"twice among {', '.join(name(k) for k in keys)}",
                origin_of(origins, (block, "layout")),
            )


def source_from_options(
    given: dict[str, Any], option_names: dict[str, str], base: SourceConfig | None = None
) -> SourceConfig:
    """A SourceConfig from command-line source options, checked like a curriculum's block.

    `given` maps SourceConfig fields to what was typed (None: not given; `load_dataset` is a list of
    KEY=VALUE strings). Without a `source`, the options change `base` (a run's saved eval block)."""
    problems = Problems("command line")
    values: dict[str, Any] = source_fields(base) if base is not None else {}
    for key, value in given.items():
        if value is None or value == []:
            continue
        if key == "load_dataset":
            parsed = dict(values.get("load_dataset") or {})
            for text in value:
                item, sep, raw = text.partition("=")
                if not sep or not item.strip():
                    problems.add(f"{option_names[key]} expects KEY=VALUE, e.g. name=pair, got {text!r}")
                    continue
                parsed[item.strip()] = parse_override_value(raw)
            value = parsed
        try:
            values[key] = SOURCE_KEYS[key](value, value if isinstance(value, str) else None)
        except schema.Invalid as invalid:
            problems.add(f"{option_names[key]} must be {invalid.expected}, got {show_value(value)}{invalid.hint}")
    if "source" not in values:
        problems.add(f"{option_names['source']} is required here")
    check_source_block("", values, {}, problems, name=lambda key: option_names[key])
    if problems.messages:
        raise ConfigError(problems.messages)
    return SourceConfig(**values)
