"""Validation: the parsed YAML tree (overrides applied) in, frozen dataclasses out.

Every problem is collected, each naming the file, the phase and the key, so a user fixes everything
in one edit and a long run never dies on a typo in phase 3. `load_curriculum` is the entry point.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from tripletctl.config import schema
from tripletctl.config.blocks import (
    BLOCK_KEYS,
    BLOCKS,
    PHASE_KEYS,
    PHASE_KEYS_FROM_TRAIN,
    PLATEAU_KEYS,
    SOURCE_KEYS,
    TOP_KEYS,
    UNTIL_KEYS,
    Curriculum,
    DataConfig,
    EvalConfig,
    ModelConfig,
    PhaseConfig,
    SourceConfig,
    TrainConfig,
    chunking_conflict,
    source_fields,
)
from tripletctl.config.layouts import LAYOUT_OF
from tripletctl.config.loss_rules import DEFAULT_LOSS, refusals
from tripletctl.config.overrides import apply_override, parse_override_value
from tripletctl.config.problems import Override, Problems, origin_of, phase_label, show_value, unknown_key
from tripletctl.config.sizing import DataFacts, batch_fill
from tripletctl.config.until import CONDITIONS, Plateau, UntilConfig, default_min_steps
from tripletctl.config.yaml_io import read_yaml
from tripletctl.core.errors import ConfigError


def _resolve_path(value: Any, base_dir: str) -> Any:
    """`./x` and `../x` are local paths relative to `base_dir`; anything else (a hub name such as
    `bert-base-uncased` or `org/name`, an absolute path) is left as written."""
    if isinstance(value, dict):
        return {label: _resolve_path(glob, base_dir) for label, glob in value.items()}
    if isinstance(value, str) and (value in (".", "..") or value.startswith(("./", "../"))):
        return os.path.normpath(os.path.join(base_dir, value))
    return value


def _expand_home(value: Any) -> Any:
    """`~/x` and `~user/x` as the shell would expand them, in a path or in each path of a mapping."""
    if isinstance(value, dict):
        return {label: _expand_home(glob) for label, glob in value.items()}
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def _check_keys(
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
    values = _check_keys(
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


EVERY_UNKNOWN = -1


def _check_loss(values: dict, label: str, index: int, origins: dict, problems: Problems) -> None:
    """Loss, mining mode, guard, memory and collapse action together: the combinations the table of
    config/loss_rules.py refuses, each as one line naming the phase and the key."""

    def origin(*keys: str) -> Override | None:
        return next((o for o in (origin_of(origins, ("phases", index, k)) for k in keys) if o), None)

    found = refusals(
        values.get("loss", DEFAULT_LOSS),
        values.get("mining"),
        guard=values.get("false_negative_guard") is not None,
        memory=values.get("memory") is not None,
        on_collapse=values.get("on_collapse"),
    )
    for message, keys in found:
        problems.add(f"{label}: {message}", origin(*keys))


def _check_until(
    raw: dict, steps: int | None, eval_every: int | None, label: str, index: int, origins: dict, problems: Problems
) -> UntilConfig | None:
    """A phase's `until:` block; every problem is reported, each on its own line."""
    before = len(problems.messages)
    key_path = ("phases", index, "until")
    values = _check_keys(
        raw,
        UNTIL_KEYS,
        (),
        context=f"{label}: ",
        qualifier="until.",
        key_path=key_path,
        origins=origins,
        problems=problems,
    )
    for name, keys in PLATEAU_KEYS.items():
        if values.get(name) is not None:
            checked = _check_keys(
                values[name],
                keys,
                schema.required(Plateau),
                context=f"{label}: ",
                qualifier=f"until.{name}.",
                key_path=(*key_path, name),
                origins=origins,
                problems=problems,
            )
            values[name] = Plateau(**checked) if set(schema.required(Plateau)) <= set(checked) else None
    if all(raw.get(name) is None for name in CONDITIONS) and set(raw) <= set(UNTIL_KEYS):
        problems.add(
            f"{label}: until must set at least one condition ({', '.join(CONDITIONS)})", origin_of(origins, key_path)
        )
    if steps is not None:
        values.setdefault("min_steps", default_min_steps(steps))
        if values["min_steps"] > steps:
            problems.add(
                f"{label}: until.min_steps must be at most steps ({steps}), got {values['min_steps']}",
                origin_of(origins, (*key_path, "min_steps")) or origin_of(origins, ("phases", index, "steps")),
            )
    if values.get("eval_plateau") is not None and eval_every != EVERY_UNKNOWN:
        origin = origin_of(origins, (*key_path, "eval_plateau"))
        if not eval_every:
            problems.add(
                f"{label}: until.eval_plateau needs held-out evals inside the phase: set eval.every "
                f"(and an eval block), got {'no eval block' if eval_every is None else 'eval.every 0'}",
                origin,
            )
    if len(problems.messages) > before or "min_steps" not in values:
        return None  # an invalid `steps` (already reported) leaves min_steps without its default
    return UntilConfig(**values)


def _check_phases(
    tree: dict,
    train: dict,
    group: tuple[int, str] | None,
    origins: dict,
    problems: Problems,
    eval_every: int | None = None,
) -> list[dict] | None:
    """`group`: the rows one class brings to a batch and how messages name them (None: unknown)."""
    raw_phases = tree.get("phases")
    if raw_phases is None:
        problems.add("missing required key 'phases' (a non-empty list of phases)")
        return None
    if not isinstance(raw_phases, list) or not raw_phases:
        problems.add(
            f"phases must be a non-empty list of phases, got {show_value(raw_phases)}", origin_of(origins, ("phases",))
        )
        return None
    phases, first_index_of = [], {}
    for index, raw_phase in enumerate(raw_phases):
        label = phase_label(index, raw_phase)
        if not isinstance(raw_phase, dict):
            problems.add(
                f"{label}: must be a mapping with name, mining, batch_size and steps, got {show_value(raw_phase)}",
                origin_of(origins, ("phases", index)),
            )
            continue
        values = _check_keys(
            raw_phase,
            PHASE_KEYS,
            schema.required(PhaseConfig),
            context=f"{label}: ",
            qualifier="",
            key_path=("phases", index),
            origins=origins,
            problems=problems,
        )
        if chunking_conflict(values):
            problems.add(
                f"{label}: set chunk_size (rows per chunk) or chunk_tokens (a token budget), not both, "
                f"got chunk_size {values['chunk_size']} and chunk_tokens {show_value(values['chunk_tokens'])}",
                origin_of(origins, ("phases", index, "chunk_tokens")),
            )
        elif "chunk_size" in values and "chunk_tokens" not in values:
            values["chunk_tokens"] = None  # the phase's row count wins over the train block's budget
        elif "chunk_tokens" in values and "chunk_size" not in values:
            values["chunk_size"] = "auto"  # and its budget over the train block's row count
        for key, train_key in PHASE_KEYS_FROM_TRAIN.items():
            if key not in values and train_key in train:
                values[key] = train[train_key]
        _check_loss(values, label, index, origins, problems)
        if values.get("until") is not None:
            values["until"] = _check_until(
                values["until"], values.get("steps"), eval_every, label, index, origins, problems
            )
        batch_size = values.get("batch_size")
        batch_origin = origin_of(origins, ("phases", index, "batch_size"))
        if batch_size is not None and group is not None:
            rows, what = group
            if batch_size % rows:
                problems.add(
                    f"{label}: batch_size must be a multiple of {what} ({rows}), got {batch_size}", batch_origin
                )
            elif batch_size // rows < 2:
                problems.add(
                    f"{label}: batch_size must hold at least 2 classes of {what} ({rows}) rows, "
                    f"i.e. be at least {2 * rows}, got {batch_size}",
                    batch_origin,
                )
        name = values.get("name")
        if name in first_index_of:
            problems.add(
                f"{label}: duplicate phase name '{name}' (also phases[{first_index_of[name]}])",
                origin_of(origins, ("phases", index, "name")),
            )
        elif name is not None:
            first_index_of[name] = index
        phases.append(values)
    return phases


ReadData = Callable[[str, SourceConfig], DataFacts | None]
"""What `load_curriculum` may call to read a block's source ("data" or "eval"): data/header.py's
`FactsReader` (passed by the CLI: the config layer itself reads no data)."""


def _check_data(
    read_data: ReadData,
    blocks: list[tuple[str, dict, set[str]]],
    phases: list[dict] | None,
    origins: dict,
    problems: Problems,
) -> None:
    """The sources as read (local files): their columns and usable rows, and the phase batch sizes
    their classes cannot fill (only when the whole source was read: then the counts are exact)."""
    facts: dict[str, DataFacts | None] = {}
    for block, values, invalid in blocks:
        if invalid & set(SOURCE_KEYS):
            continue  # already reported: nothing sensible to read
        facts[block] = read_data(block, SourceConfig(**{key: values[key] for key in SOURCE_KEYS}))
        for problem in facts[block].problems if facts[block] is not None else ():
            problems.add(f"{block}: {problem}", origin_of(origins, (block, "source")))
    data, found = blocks[0][1], facts.get("data")
    if found is None or found.problems or not found.complete or found.class_rows is None:
        return
    if "samples_per_class" in blocks[0][2] or LAYOUT_OF[data["layout"]].grouped:
        return
    for index, phase in enumerate(phases or []):
        batch = phase.get("batch_size")
        if not isinstance(batch, int):
            continue
        kind, why = batch_fill(found.class_rows, batch, data["samples_per_class"])
        if kind == "never":
            problems.add(
                f"{phase_label(index, phase)}: batch_size {batch} cannot be filled from data.source "
                f"'{found.label}' (all {found.rows_read:,} rows read): {why}",
                origin_of(origins, ("phases", index, "batch_size")),
            )


def _check_tree(
    tree: Any, path: str, origins: dict, problems: Problems, read_data: ReadData | None = None
) -> Curriculum | None:
    if tree is None:
        problems.add("the curriculum is empty: expected model, data, train and phases")
        return None
    if not isinstance(tree, dict):
        problems.add(
            f"expected a mapping with model, data, train, phases (and optional eval) at the top, got {show_value(tree)}"
        )
        return None
    for key in tree:
        if key not in TOP_KEYS:
            problems.add(unknown_key(str(key), TOP_KEYS), origin_of(origins, (key,)))
    file_dir = os.path.dirname(os.path.abspath(path))
    model, _ = check_block(tree, "model", file_dir, origins, problems)
    data, invalid_data = check_block(tree, "data", file_dir, origins, problems)
    check_source_block("data", data, origins, problems)
    train, _ = check_block(tree, "train", file_dir, origins, problems)
    if chunking_conflict(train):
        problems.add(
            f"train: set chunk_size (rows per chunk) or chunk_tokens (a token budget), not both, got "
            f"chunk_size {train['chunk_size']} and chunk_tokens {show_value(train['chunk_tokens'])}",
            origin_of(origins, ("train", "chunk_tokens")),
        )
    evaluation, invalid_eval = None, set()
    if tree.get("eval") is not None:
        evaluation, invalid_eval = check_block(tree, "eval", file_dir, origins, problems)
        check_source_block("eval", evaluation, origins, problems)
    samples_per_class = None if "samples_per_class" in invalid_data else data["samples_per_class"]
    layout = LAYOUT_OF[data["layout"]]
    if layout.grouped and samples_per_class not in (2, None):
        problems.add(
            f"data.samples_per_class must be 2 when data.layout is {layout.name} ({layout.class_of_a_row}), "
            f"got {samples_per_class}",
            origin_of(origins, ("data", "samples_per_class")) or origin_of(origins, ("data", "layout")),
        )
    if train.get("keep_best") is not None and evaluation is None:
        problems.add(
            f"train.keep_best ({train['keep_best']}) needs an eval block: the best model is judged on held-out data",
            origin_of(origins, ("train", "keep_best")),
        )
    eval_every = evaluation["every"] if evaluation is not None else None
    if "every" in invalid_eval:
        eval_every = EVERY_UNKNOWN  # already reported: no second error about it
    group = None if samples_per_class is None else (samples_per_class, "data.samples_per_class")
    if layout.given_negatives and "negative_columns" not in invalid_data:
        negatives = len(data["negative_columns"])
        group = (
            2 + negatives,
            f"the rows of one triplet group (anchor, positive and {negatives} negative{'s' if negatives > 1 else ''})",
        )
    phases = _check_phases(tree, train, group, origins, problems, eval_every)
    if read_data is not None:
        blocks = [("data", data, invalid_data)] + (
            [("eval", evaluation, invalid_eval)] if evaluation is not None else []
        )
        _check_data(read_data, blocks, phases, origins, problems)
    if phases and "max_buffered_rows" not in invalid_data:
        largest = max((p.get("batch_size") or 0 for p in phases), default=0)
        if data["max_buffered_rows"] < largest:
            problems.add(
                f"data.max_buffered_rows must be at least the largest phase batch_size ({largest}) so a whole "
                f"batch fits in the buffers, got {data['max_buffered_rows']}",
                origin_of(origins, ("data", "max_buffered_rows")),
            )
    if problems.messages:
        return None
    return Curriculum(
        path=path,
        model=ModelConfig(**model),
        data=DataConfig(**data),
        train=TrainConfig(**train),
        phases=tuple(PhaseConfig(**values) for values in phases),
        eval=EvalConfig(**evaluation) if evaluation is not None else None,
    )


def load_curriculum(
    path: str | os.PathLike, overrides: Sequence[str] = (), read_data: ReadData | None = None
) -> Curriculum:
    """Read, override and check a curriculum; raise ConfigError listing every problem found.

    Without `read_data` it reads the one file and touches neither the network nor any path named
    inside it. With it (`validate` and `train` pass data/header.py's), the local data the file names
    is read too: wrong columns, no usable rows and batch sizes the classes cannot fill join the list.
    """
    label = str(path)
    problems = Problems(label)
    tree = read_yaml(label, problems)
    origins: dict[tuple, Override] = {}
    if isinstance(tree, dict):
        for text in overrides:
            apply_override(tree, text, origins, problems)
    curriculum = _check_tree(tree, label, origins, problems, read_data)
    if problems.messages or curriculum is None:
        raise ConfigError(problems.messages)
    return curriculum


def load_eval_block(path: str | os.PathLike, block: str = "eval") -> EvalConfig | DataConfig | None:
    """Only the `eval` block (or `block: "data"`) of a curriculum (the copy saved with a run), checked
    like `load_curriculum` checks it; None when there is none. The rest of the file is not needed to
    re-run the evaluation."""
    label = str(path)
    problems = Problems(label)
    tree = read_yaml(label, problems)
    if not isinstance(tree, dict) or tree.get(block) is None:
        return None
    values, _ = check_block(tree, block, os.path.dirname(os.path.abspath(label)), {}, problems)
    check_source_block(block, values, {}, problems)
    if problems.messages:
        raise ConfigError(problems.messages)
    return BLOCKS[block](**values)
