"""Validation: the parsed YAML tree (overrides applied) in, frozen dataclasses out.

Every problem is collected, each naming the file, the phase and the key, so a user fixes everything
in one edit and a long run never dies on a typo in phase 3. `load_curriculum` is the entry point:
the top level and each block (block_checks.py), what one block asks of another, the phases
(phase_checks.py), the local data as read, then the frozen `Curriculum`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from tripletctl.config.block_checks import check_block, check_source_block
from tripletctl.config.blocks import (
    BLOCKS,
    SOURCE_KEYS,
    TOP_KEYS,
    Curriculum,
    DataConfig,
    EvalConfig,
    ModelConfig,
    PhaseConfig,
    SourceConfig,
    TrainConfig,
    chunking_conflict,
)
from tripletctl.config.layouts import LAYOUT_OF
from tripletctl.config.mined_negatives import MinedNegativesConfig, stream_rows
from tripletctl.config.overrides import apply_override
from tripletctl.config.phase_checks import EVERY_UNKNOWN, check_neighbour_phases, check_phases
from tripletctl.config.problems import Override, Problems, origin_of, phase_label, show_value, unknown_key
from tripletctl.config.sizing import DataFacts, batch_fill
from tripletctl.config.yaml_io import read_yaml
from tripletctl.core.errors import ConfigError

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
        mined = phase.get("mined_negatives")  # its rows come from the mined table, not the batcher
        drawn = stream_rows(
            batch, data["samples_per_class"], mined if isinstance(mined, MinedNegativesConfig) else None
        )
        kind, why = batch_fill(found.class_rows, drawn, data["samples_per_class"])
        if kind == "never":
            problems.add(
                f"{phase_label(index, phase)}: batch_size {batch} cannot be filled from data.source "
                f"'{found.label}' (all {found.rows_read:,} rows read): {why}",
                origin_of(origins, ("phases", index, "batch_size")),
            )


def _check_tree(
    tree: Any, path: str, origins: dict, problems: Problems, read_data: ReadData | None = None
) -> Curriculum | None:
    if not _check_top(tree, origins, problems):
        return None
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
    _check_blocks_agree(data, invalid_data, train, evaluation, origins, problems)
    eval_every = evaluation["every"] if evaluation is not None else None
    if "every" in invalid_eval:
        eval_every = EVERY_UNKNOWN  # already reported: no second error about it
    phases = check_phases(tree, train, _batch_group(data, invalid_data), origins, problems, eval_every)
    if "layout" not in invalid_data:
        check_neighbour_phases(phases, data, invalid_data, origins, problems)
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


def _check_top(tree: Any, origins: dict, problems: Problems) -> bool:
    """The file holds a mapping of known blocks; False: nothing else can be checked."""
    if tree is None:
        problems.add("the curriculum is empty: expected model, data, train and phases")
        return False
    if not isinstance(tree, dict):
        problems.add(
            f"expected a mapping with model, data, train, phases (and optional eval) at the top, got {show_value(tree)}"
        )
        return False
    for key in tree:
        if key not in TOP_KEYS:
            problems.add(unknown_key(str(key), TOP_KEYS), origin_of(origins, (key,)))
    return True


def _check_blocks_agree(
    data: dict, invalid_data: set[str], train: dict, evaluation: dict | None, origins: dict, problems: Problems
) -> None:
    """What one block asks of another: a grouped layout's two rows per class, keep_best's eval block."""
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


def _batch_group(data: dict, invalid_data: set[str]) -> tuple[int, str] | None:
    """The rows one class (or one triplet group) brings to a batch, and how messages name them."""
    samples_per_class = None if "samples_per_class" in invalid_data else data["samples_per_class"]
    group = None if samples_per_class is None else (samples_per_class, "data.samples_per_class")
    if LAYOUT_OF[data["layout"]].given_negatives and "negative_columns" not in invalid_data:
        negatives = len(data["negative_columns"])
        group = (
            2 + negatives,
            f"the rows of one triplet group (anchor, positive and {negatives} negative{'s' if negatives > 1 else ''})",
        )
    return group


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
