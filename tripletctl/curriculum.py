"""A curriculum: the YAML file that says what to train, on which data, and how hard to mine, phase
by phase.

Loading turns the file plus `key=value` overrides into frozen dataclasses and checks every value
before any work starts. All problems are reported together, each naming the file, the phase and the
key, so a long run never dies on a typo in phase 3 and a user fixes everything in one edit.

Each key is declared once, as a field of its block's dataclass (`schema.key`: default, check,
required / path flags, help); the tables the loader walks are derived from those fields.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tripletctl import schema
from tripletctl.conditions import (
    CONDITIONS,
    EVAL_METRICS,
    Plateau,
    UntilConfig,
    default_min_steps,
)
from tripletctl.errors import ConfigError
from tripletctl.sources import FORMATS, LAYOUTS
from tripletctl.trackers import TRACKERS

# The choices a curriculum offers that torch-backed modules implement are named here, not there, so
# that loading a curriculum (`tripletctl validate`) never imports torch: mining.py and model.py
# import these. Metric names belong to conditions.py, tracker names to trackers.py, data formats and
# layouts to sources.py (all three light).
MINING_MODES = ("random", "semi-hard", "hard-negative", "batch-hard", "batch-all")
DISTANCES = ("euclidean", "squared-euclidean")
FALLBACKS = ("hardest", "easiest")
POOLINGS = ("mean", "cls")
INIT_MODES = ("pretrained", "config")
OPTIMIZERS = ("adamw",)
DECAYS = ("none", "linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ON_COLLAPSE = ("warn", "stop", "fallback")
ON_NONFINITE = ("stop", "skip")
PHASE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-")
PHASE_NAME_MAX = 64  # it becomes a directory name, and every message quotes it
MAX_YAML_NODES = 100_000  # a curriculum is a few hundred nodes; an alias bomb expands to billions
MAX_YAML_DEPTH = 100  # nesting; PyYAML's recursive constructor dies near 1,000

# Keys of data.load_dataset that tripletctl passes itself: a second value would be a TypeError
# deep inside `datasets`, so they are refused here with a pointer to the key that sets them.
RESERVED_LOAD_DATASET_KEYS = {
    "path": "data.source",
    "split": "data.split",
    "streaming": "tripletctl (training always streams)",
}


# --------------------------------------------------------------------------------------------
# Checks of the values only a curriculum has (the generic ones are in schema.py).


def _chunking_conflict(values: dict) -> bool:
    """A row count and a token budget together: which one is meant?"""
    return isinstance(values.get("chunk_size"), int) and values.get("chunk_tokens") is not None


def _phase_name(value: Any, raw: str | None) -> str:
    """It names the phase's directory (phase-K-NAME) and appears in every message: a short, safe name."""
    value = schema.text()(value, raw)
    if len(value) > PHASE_NAME_MAX or not set(value) <= PHASE_NAME_CHARS or value in (".", ".."):
        raise schema.Invalid(
            f"a name of at most {PHASE_NAME_MAX} letters, digits, '.', '_', '+' or '-' (it becomes a directory name)"
        )
    return value


def _trackers(value: Any, raw: str | None) -> tuple[str, ...]:
    """A list of tracker names; a single name or `none` as a convenience (HF Trainer accepts both)."""
    if value is None or value == "none":
        return ()
    names = [value] if isinstance(value, str) else value
    expected = "a list of trackers from " + ", ".join(TRACKERS) + " (or [] / none)"
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise schema.Invalid(expected)
    for name in names:
        if name not in TRACKERS:
            raise schema.Invalid(expected, schema.did_you_mean(name, TRACKERS))
    if len(set(names)) != len(names):
        raise schema.Invalid(expected + ", each at most once")
    return tuple(names)


def _layer_sizes(value: Any, raw: str | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        return tuple(value)
    raise schema.Invalid("a list of positive integers (layer sizes), e.g. [256, 128]")


def _source(value: Any, raw: str | None) -> str | dict[str, str]:
    if raw is not None and schema.is_scalar(value):
        value = raw
    if isinstance(value, str) and value.strip():
        return value
    if (
        isinstance(value, dict)
        and value
        and all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value)
        and all(isinstance(v, str) and v.strip() for v in value.values())
    ):
        return {str(label): glob for label, glob in value.items()}
    raise schema.Invalid("a hub dataset name, a local file, directory or glob, or a {label: glob} mapping")


def _column_names(value: Any, raw: str | None) -> tuple[str, ...]:
    if isinstance(value, str) and value.strip():
        value = [value]
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, str) and v.strip() for v in value)
        and len(set(value)) == len(value)
    ):
        return tuple(value)
    raise schema.Invalid("a non-empty list of distinct column names, e.g. [negative_1, negative_2]")


def _load_dataset_kwargs(value: Any, raw: str | None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
        raise schema.Invalid("a mapping of keyword arguments for datasets.load_dataset")
    for name, owner in RESERVED_LOAD_DATASET_KEYS.items():
        if name in value:
            raise schema.Invalid(f"free of '{name}', which is set by {owner}")
    return copy.deepcopy(value)  # the curriculum owns its copy: nothing outside can mutate it


# --------------------------------------------------------------------------------------------
# The blocks. docs/curricula.md explains every key; `help` is the one-line version.


@dataclass(frozen=True)
class ModelConfig:
    name: str = schema.key(check=schema.text(), required=True, path=True, help="hub name or local directory")
    init: str = schema.key(
        "pretrained",
        check=schema.choice(INIT_MODES),
        help="config: random weights from config.json, seeded by train.seed",
    )
    tokenizer: str | None = schema.key(None, check=schema.text(optional=True), path=True, help="defaults to `name`")
    pooling: str = schema.key("mean", check=schema.choice(POOLINGS), help="how token states become one vector")
    head: tuple[int, ...] = schema.key((), check=_layer_sizes, help="MLP layer sizes after pooling; () = no head")
    normalize: bool = schema.key(True, check=schema.boolean, help="project to the unit sphere")
    attn_implementation: str = schema.key(
        "sdpa", check=schema.text(), help='passed to transformers unchanged, e.g. "flash_attention_2" (unpadded)'
    )


@dataclass(frozen=True)
class SourceConfig:
    """Where rows come from and what a row is: the one description of a source, shared by the `data`
    and `eval` blocks, `tripletctl eval` / `inspect-collapse` options and the readers in sources.py.
    Layouts (docs/data.md): labelled = text + class label; pairs = anchor + positive, each pair its
    own class; triplets = anchor + positive + given negatives (negatives of every anchor in a batch)."""

    source: str | dict[str, str] = schema.key(
        check=_source, required=True, path=True, help="hub name, local file / dir / glob; format text: {label: glob}"
    )
    format: str | None = schema.key(
        None, check=schema.choice(FORMATS, optional=True), help="None: from the file extension, else a hub dataset"
    )
    split: str = schema.key("train", check=schema.text(), help="the split to read")
    layout: str = schema.key("labelled", check=schema.choice(LAYOUTS), help="what one row is (docs/data.md, Layouts)")
    text_column: str = schema.key("text", check=schema.text(), help="labelled")
    label_column: str = schema.key("label", check=schema.text(), help="labelled")
    anchor_column: str = schema.key("anchor", check=schema.text(), help="pairs, triplets")
    positive_column: str = schema.key("positive", check=schema.text(), help="pairs, triplets")
    negative_columns: tuple[str, ...] = schema.key(
        ("negative",), check=_column_names, help="triplets: e.g. [negative_1, negative_2, negative_3]"
    )
    load_dataset: dict = schema.key(
        default_factory=dict, check=_load_dataset_kwargs, help="extra kwargs, passed unchanged to datasets.load_dataset"
    )

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns one row of this layout reads, in row order."""
        if self.layout == "pairs":
            return (self.anchor_column, self.positive_column)
        if self.layout == "triplets":
            return (self.anchor_column, self.positive_column, *self.negative_columns)
        return (self.text_column, self.label_column)


def source_fields(config: SourceConfig) -> dict[str, Any]:
    """The SourceConfig part of a data or eval block (for the readers' fingerprints and messages)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(SourceConfig)}


def describe_source(source: str | dict[str, str]) -> str:
    """A source in one line, for messages and reports."""
    if isinstance(source, dict):
        return "{" + ", ".join(f"{label}: {glob}" for label, glob in source.items()) + "}"
    return source


@dataclass(frozen=True)
class DataConfig(SourceConfig):
    """The training source plus how it is streamed, batched and tokenised."""

    shuffle_buffer: int = schema.key(10_000, check=schema.integer(1), help="rows in the streaming shuffle buffer")
    max_length: int = schema.key(128, check=schema.integer(1), help="tokens per text; longer texts are truncated")
    samples_per_class: int = schema.key(4, check=schema.integer(2), help="rows of each class in a batch")
    max_buffered_rows: int = schema.key(
        200_000, check=schema.integer(1), help="bound on all per-class buffers together"
    )
    tokenizer_workers: int = schema.key(
        1, check=schema.integer(0), help="worker processes that tokenise (0 = in the main process)"
    )
    prefetch_batches: int = schema.key(2, check=schema.integer(1), help="batches prepared ahead of the training step")

    @property
    def rows_per_group(self) -> int:
        """Rows one class brings to a batch; batch_size is a whole number of these groups."""
        if self.layout == "triplets":
            return 2 + len(self.negative_columns)
        return self.samples_per_class


@dataclass(frozen=True)
class MemoryConfig:
    """Cross-batch memory (docs/mining.md): the last `size` embeddings join every step's candidates
    from the phase's step `start_step` on (the queue fills from step 0). Set whole (`_memory`)."""

    size: int
    start_step: int = 0


_MEMORY_EXPECTED = "null or a mapping {size: M, start_step: S} (M a positive integer, S a non-negative integer)"


def _memory(value: Any, raw: str | None) -> MemoryConfig | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise schema.Invalid(_MEMORY_EXPECTED)
    names = [f.name for f in dataclasses.fields(MemoryConfig)]
    unknown = [k for k in value if k not in names]
    if unknown:
        matches = difflib.get_close_matches(str(unknown[0]), names, n=1, cutoff=0.6)
        suggestion = f"; did you mean '{matches[0]}'?" if matches else ""
        raise schema.Invalid(_MEMORY_EXPECTED, f" (unknown key '{unknown[0]}'{suggestion})")
    if "size" not in value:
        raise schema.Invalid(_MEMORY_EXPECTED, " (size is missing)")
    try:
        size = schema.integer(1)(value["size"], None)
        start_step = schema.integer(0)(value.get("start_step", 0), None)
    except schema.Invalid:
        raise schema.Invalid(_MEMORY_EXPECTED) from None
    return MemoryConfig(size=size, start_step=start_step)


@dataclass(frozen=True)
class TrainConfig:
    """The run's settings; those marked "default for phases" are what a phase leaves out (PhaseConfig)."""

    optimizer: str = schema.key("adamw", check=schema.choice(OPTIMIZERS), help="the optimiser")
    lr: float = schema.key(2e-5, check=schema.number(), help="peak learning rate (default for phases)")
    weight_decay: float = schema.key(0.01, check=schema.number(positive=False), help="AdamW weight decay")
    warmup_steps: int = schema.key(100, check=schema.integer(0), help="linear warm-up, per phase (default for phases)")
    decay: str = schema.key("linear", check=schema.choice(DECAYS), help="to 0 at the end of each phase")
    grad_clip: float = schema.key(1.0, check=schema.number(positive=False), help="gradient-norm clipping; 0 disables")
    precision: str = schema.key(
        "auto", check=schema.choice(PRECISIONS), help="auto: bf16 autocast on CUDA, fp32 on CPU"
    )
    # torch.manual_seed's range; the per-step mining seed derives from it
    seed: int = schema.key(
        0, check=schema.integer(0, 2**32 - 1), help="seeds initialisation, shuffling and random mining"
    )
    output_dir: str = schema.key("runs/tripletctl", check=schema.text(), help="relative to the current directory")
    checkpoint_every: int = schema.key(
        0, check=schema.integer(0), help="steps; 0 = only at the end of each phase (and on Ctrl-C/SIGTERM)"
    )
    device: str = schema.key("auto", check=schema.choice(DEVICES), help="auto: CUDA when available")
    chunk_size: int | str = schema.key(
        "auto", check=schema.int_or_auto, help="rows per forward chunk (gradient caching); auto: a token budget"
    )
    chunk_tokens: int | str | None = schema.key(
        None, check=schema.int_or_auto_or_null, help="padded tokens per length-sorted chunk; auto fits free memory"
    )
    compile: bool = schema.key(False, check=schema.boolean, help="torch.compile the encoder")
    distance: str = schema.key(
        "euclidean", check=schema.choice(DISTANCES), help="of the loss and mining (default for phases)"
    )
    fallback: str = schema.key(
        "hardest", check=schema.choice(FALLBACKS), help="semi-hard fallback (default for phases)"
    )
    on_collapse: str = schema.key(
        "warn", check=schema.choice(ON_COLLAPSE), help="the watchdog's action (default for phases)"
    )
    collapse_patience: int = schema.key(50, check=schema.integer(1), help="consecutive steps")
    collapse_tolerance: float = schema.key(0.1, check=schema.number(positive=False), help="relative to the margin")
    memory: MemoryConfig | None = schema.key(
        None, check=_memory, help="cross-batch memory (default for phases); None = off"
    )
    log_every: int | str = schema.key(
        "auto", check=schema.int_or_auto, help="plain progress lines (stdout not a terminal): every N steps, or auto"
    )
    report_to: tuple[str, ...] = schema.key((), check=_trackers, help="experiment trackers, any of TRACKERS")
    keep_best: str | None = schema.key(
        None,
        check=schema.choice(EVAL_METRICS, optional=True),
        help="an EVAL_METRICS name: keep the best held-out model under OUTPUT/best",
    )
    on_nonfinite: str = schema.key(
        "stop",
        check=schema.choice(ON_NONFINITE),
        help="a NaN/inf loss or gradient: stop, or skip the step (default for phases)",
    )
    max_nonfinite_skips: int = schema.key(
        10, check=schema.integer(1), help="skip: stop after this many non-finite steps in a row"
    )


def _from_train(name: str) -> Any:
    """A phase key that defaults to the train block's key `name`: same check, help and default."""
    declared = TrainConfig.__dataclass_fields__[name]
    return dataclasses.field(default=declared.default, metadata={**declared.metadata, "train": name})


@dataclass(frozen=True)
class PhaseConfig:
    """One phase, complete: `load_curriculum` fills every key the file leaves out from the train block
    (the fields declared with `_from_train`), so the runner never looks anywhere else."""

    name: str = schema.key(check=_phase_name, required=True, help="names the phase in logs, checkpoints and errors")
    mining: str = schema.key(
        check=schema.choice(MINING_MODES), required=True, help="how triplets are chosen in each batch"
    )
    batch_size: int = schema.key(check=schema.integer(1), required=True, help="rows per step, across all processes")
    steps: int = schema.key(check=schema.integer(1), required=True, help="optimiser steps; with `until`, the most")
    margin: float = schema.key(0.2, check=schema.number(), help="the triplet loss margin")
    lr: float = _from_train("lr")
    warmup_steps: int = _from_train("warmup_steps")
    distance: str = _from_train("distance")
    fallback: str = _from_train("fallback")
    chunk_size: int | str = _from_train("chunk_size")
    chunk_tokens: int | str | None = _from_train("chunk_tokens")
    on_collapse: str = _from_train("on_collapse")
    until: UntilConfig | None = schema.key(
        None,
        check=schema.mapping("a mapping of end conditions, e.g. {active_fraction_below: 0.05}, or null"),
        help="end conditions; `steps` is then the maximum (conditions.py)",
    )
    memory: MemoryConfig | None = _from_train("memory")
    on_nonfinite: str = _from_train("on_nonfinite")


@dataclass(frozen=True)
class EvalConfig(SourceConfig):
    """The held-out source plus how much of it to read and when."""

    max_rows: int = schema.key(2000, check=schema.integer(1), help="texts read, whole rows only")
    every: int = schema.key(
        0, check=schema.integer(0), help="also evaluate every N steps inside a phase; 0 = phase ends only"
    )
    batch_size: int = schema.key(256, check=schema.integer(1), help="encoding batch size")


@dataclass(frozen=True)
class Curriculum:
    path: str = field(compare=False)  # the file it came from, for messages; not part of equality
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    phases: tuple[PhaseConfig, ...]
    eval: EvalConfig | None = None


# --------------------------------------------------------------------------------------------
# The schema, derived from the fields above: which keys each block accepts and how each value is
# checked, which are required, which are paths, and which phase keys default to the train block's.

_BLOCKS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
TOP_KEYS = tuple(f.name for f in dataclasses.fields(Curriculum) if f.name != "path")
BLOCK_KEYS: dict[str, dict[str, schema.Check]] = {block: schema.checks(cls) for block, cls in _BLOCKS.items()}
PHASE_KEYS: dict[str, schema.Check] = schema.checks(PhaseConfig)
PHASE_KEYS_FROM_TRAIN = {f.name: f.metadata["train"] for f in dataclasses.fields(PhaseConfig) if "train" in f.metadata}
UNTIL_KEYS: dict[str, schema.Check] = schema.checks(UntilConfig)
# `until.plateau` / `until.eval_plateau`: the Plateau keys, with the metric names of that condition
PLATEAU_KEYS: dict[str, dict[str, schema.Check]] = {
    f.name: {**schema.checks(Plateau), "metric": schema.choice(f.metadata["metrics"])}
    for f in dataclasses.fields(UntilConfig)
    if "metrics" in f.metadata
}
_SOURCE_KEYS = schema.checks(SourceConfig)


# --------------------------------------------------------------------------------------------
# Reading the file and collecting problems.


@dataclass(frozen=True)
class _Override:
    text: str  # as typed, for messages
    value_text: str  # the part after '=', for keys whose type is a string


class _Problems:
    """Every problem found so far, each prefixed with the file (and the override it came from)."""

    def __init__(self, path: str):
        self.path = path
        self.messages: list[str] = []

    def add(self, message: str, override: _Override | None = None) -> None:
        origin = f"override '{override.text}': " if override else ""
        self.messages.append(f"{self.path}: {origin}{message}")


class _DuplicateKeyLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys, which PyYAML would resolve silently (the
    last one wins), hiding the first value from the user."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    self.duplicates.append((key_node.start_mark.line + 1, key_node.value))
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


class _YamlTooBig(yaml.YAMLError):
    """A document nested too deep or expanding (through aliases) to too many values."""


def _check_yaml_size(text: str) -> None:
    """Refuse, before anything is built, documents nested deeper than MAX_YAML_DEPTH (PyYAML's
    recursive composer would die with RecursionError) or whose aliases expand past MAX_YAML_NODES
    values (a "billion laughs" bomb: tiny on disk, gigabytes once walked or printed)."""
    depth = 0
    events = yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # flat, no recursion
    try:
        for event in events:
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise _YamlTooBig(
                        f"line {event.start_mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep"
                    )
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError as error:
        if "nesting depth" in str(error):  # libyaml's own limit, hit before ours while scanning ahead
            raise _YamlTooBig(f"nested more than {MAX_YAML_DEPTH} levels deep") from None
        raise
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    if root is not None:
        _expanded_size(root)


def _expanded_size(root: yaml.Node) -> None:
    """Values and depth of the node graph as a reader would see it (every alias expanded), counted
    without expanding anything: each node once, iteratively, with what it expands to remembered."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in size:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if not children_done:
            if key in open_nodes:
                raise _YamlTooBig(
                    f"line {node.start_mark.line + 1}: an alias refers to the collection that contains it"
                )
            open_nodes.add(key)
            stack.append((node, True))
            for child in children:
                if id(child) in open_nodes:
                    raise _YamlTooBig(
                        f"line {child.start_mark.line + 1}: an alias refers to the collection that contains it"
                    )
                if id(child) not in size:
                    stack.append((child, False))
            continue
        open_nodes.discard(key)
        size[key] = 1 + sum(size[id(c)] for c in children)
        depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
        if size[key] > MAX_YAML_NODES:
            raise _YamlTooBig(
                f"line {node.start_mark.line + 1}: the document expands (through &anchors and "
                f"*aliases) to more than {MAX_YAML_NODES:,} values"
            )
        if depth[key] > MAX_YAML_DEPTH:
            raise _YamlTooBig(
                f"line {node.start_mark.line + 1}: nested (through &anchors and *aliases) more "
                f"than {MAX_YAML_DEPTH} levels deep"
            )


def safe_yaml_load(text: str) -> Any:
    """yaml.safe_load for text from users: bounded in depth and in alias expansion (raises _YamlTooBig)."""
    _check_yaml_size(text)
    return yaml.safe_load(text)


def _read_yaml(path: str, problems: _Problems) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read the curriculum: {error.strerror or error}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: cannot read the curriculum: not UTF-8 text"]) from None
    try:
        _check_yaml_size(text)
    except _YamlTooBig as error:
        raise ConfigError([f"{path}: {error}; refused"]) from None
    except yaml.YAMLError:
        pass  # malformed: the loader below reports where
    loader = _DuplicateKeyLoader(text)
    try:
        tree = loader.get_single_data()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError([f"{path}: {where}malformed YAML: {problem}"]) from None
    finally:
        loader.dispose()
    for line, key in loader.duplicates:
        problems.add(f"line {line}: duplicate key '{key}' (YAML would silently keep only the last value)")
    return tree


def _show(value: Any) -> str:
    """A value as the user wrote it, short enough for a one-line message."""
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif value is None:
        shown = "null"
    else:
        shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _unknown_key(key: str, options: Sequence[str], qualifier: str = "") -> str:
    matches = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    hint = f" (did you mean '{qualifier}{matches[0]}'?)" if matches else ""
    return f"unknown key '{qualifier}{key}'{hint}"


def _phase_label(index: int, raw_phase: Any) -> str:
    """`phases[2] (hard)`; an invalid name (too long, control characters...) is left out."""
    name = raw_phase.get("name") if isinstance(raw_phase, dict) else None
    try:
        return f"phases[{index}] ({_phase_name(name, None)})"
    except schema.Invalid:
        return f"phases[{index}]"


# --------------------------------------------------------------------------------------------
# Overrides: applied to the parsed YAML tree before validation, so an overridden value is checked
# exactly like one written in the file. Each records where it came from, for messages and for
# resolving relative paths against the current directory instead of the file's.


def _parse_override_value(text: str) -> Any:
    try:
        return safe_yaml_load(text)
    except _YamlTooBig:
        raise
    except yaml.YAMLError:  # e.g. `*.parquet` reads as a YAML alias: it is meant as plain text
        return text


def _apply_override(tree: dict, text: str, origins: dict[tuple, _Override], problems: _Problems) -> None:
    key, sep, value_text = text.partition("=")
    key = key.strip()
    override = _Override(text, value_text.strip())
    if not sep or not key:
        problems.add("expected key=value, e.g. train.lr=3e-5", override)
        return
    try:
        value = _parse_override_value(value_text)
    except _YamlTooBig as error:
        problems.add(f"the value is not usable YAML: {error}", override)
        return
    parts = key.split(".")
    top = parts[0]
    if top not in TOP_KEYS:
        matches = difflib.get_close_matches(top, TOP_KEYS, n=1, cutoff=0.6)
        hint = f" (did you mean '{'.'.join([matches[0], *parts[1:]])}'?)" if matches else ""
        problems.add(f"unknown key '{key}'{hint}", override)
        return
    if len(parts) == 1 and top == "phases":  # docs: overrides change phases, never add or remove them
        count = len(tree["phases"]) if isinstance(tree.get("phases"), list) else 0
        if not isinstance(value, list) or len(value) != count:
            given = f"{len(value)} phases" if isinstance(value, list) else _show(value)
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
        problems.add(_unknown_key(name, list(BLOCK_KEYS[top]), f"{top}."), override)
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
    tree: dict, parts: list[str], value: Any, override: _Override, origins: dict, problems: _Problems
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
    label = _phase_label(index, phases[index])
    if len(parts) != 3 and not (len(parts) in (4, 5) and parts[2] == "until"):  # until.KEY, until.plateau.KEY
        problems.add(f"{label}: expected phases.{index}.KEY, e.g. phases.{index}.steps=500", override)
        return
    name = parts[2]
    if name not in PHASE_KEYS:
        problems.add(f"{label}: {_unknown_key(name, list(PHASE_KEYS))}", override)
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


def _origin(origins: dict[tuple, _Override], key_path: tuple) -> _Override | None:
    """The override that set this key (or a block containing it), if any."""
    for length in range(len(key_path), 0, -1):
        if key_path[:length] in origins:
            return origins[key_path[:length]]
    return None


# --------------------------------------------------------------------------------------------
# Validation: raw tree -> checked values, with every problem collected.


def _resolve_path(value: Any, base_dir: str) -> Any:
    """`./x` and `../x` are local paths relative to `base_dir`; anything else (a hub name such as
    `bert-base-uncased` or `org/name`, an absolute path) is left as written."""
    if isinstance(value, dict):
        return {label: _resolve_path(glob, base_dir) for label, glob in value.items()}
    if isinstance(value, str) and (value in (".", "..") or value.startswith(("./", "../"))):
        return os.path.normpath(os.path.join(base_dir, value))
    return value


def _check_keys(
    raw: dict,
    checks: dict[str, schema.Check],
    required: Sequence[str],
    *,
    context: str,
    qualifier: str,
    key_path: tuple,
    origins: dict[tuple, _Override],
    problems: _Problems,
) -> dict[str, Any]:
    """Check one mapping; returns the valid values (keys with problems are left out)."""
    values: dict[str, Any] = {}
    for key, value in raw.items():
        origin = _origin(origins, (*key_path, key))
        if key not in checks:
            problems.add(f"{context}{_unknown_key(str(key), list(checks), qualifier)}", origin)
            continue
        exact = origins.get((*key_path, key))
        try:
            values[key] = checks[key](value, exact.value_text if exact else None)
        except schema.Invalid as invalid:
            problems.add(
                f"{context}{qualifier}{key} must be {invalid.expected}, got {_show(value)}{invalid.hint}", origin
            )
    for key in required:
        if key not in raw:
            problems.add(f"{context}missing required key '{qualifier}{key}'", _origin(origins, key_path))
    return values


def _check_block(
    tree: dict, block: str, file_dir: str, origins: dict[tuple, _Override], problems: _Problems
) -> tuple[dict[str, Any], set[str]]:
    """Values of one block with defaults filled in, and the keys whose written value was invalid
    (so rules between keys can skip them instead of piling a second error onto a default)."""
    raw = tree.get(block)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.add(f"{block} must be a mapping of keys, got {_show(raw)}", _origin(origins, (block,)))
        return schema.defaults(_BLOCKS[block]), set(BLOCK_KEYS[block])
    values = _check_keys(
        raw,
        BLOCK_KEYS[block],
        schema.required(_BLOCKS[block]),
        context="",
        qualifier=f"{block}.",
        key_path=(block,),
        origins=origins,
        problems=problems,
    )
    for key in schema.paths(_BLOCKS[block]):
        if key in values:
            base_dir = os.getcwd() if _origin(origins, (block, key)) else file_dir
            values[key] = _resolve_path(values[key], base_dir)
    invalid = {key for key in raw if key in BLOCK_KEYS[block] and key not in values}
    return {**schema.defaults(_BLOCKS[block]), **values}, invalid


def _check_source_block(
    block: str, values: dict, origins: dict, problems: _Problems, name: Callable[[str], str] | None = None
) -> None:
    """Rules between keys shared by `data`, `eval` and the command line's source options (`name`
    spells a key as the user typed it: `eval.layout`, or `--layout`)."""
    name = name or (lambda key: f"{block}.{key}")
    source, fmt = values.get("source"), values.get("format")
    if isinstance(source, dict) and fmt is None:  # a {label: glob} mapping can only be plain text files
        values["format"] = fmt = "text"
    if isinstance(source, dict) and fmt != "text":
        problems.add(
            f"{name('source')} is a {{label: glob}} mapping, which needs {name('format')}: text, got {_show(fmt)}",
            _origin(origins, (block, "format")) or _origin(origins, (block, "source")),
        )
    if isinstance(source, str) and fmt == "text":
        problems.add(
            f"{name('source')} must be a {{label: glob}} mapping when {name('format')} is text "
            f"(plain text files carry no labels), got {_show(source)}",
            _origin(origins, (block, "source")),
        )
    layout = values.get("layout")
    if fmt == "text" and layout in ("pairs", "triplets"):
        problems.add(
            f"{name('layout')} must be labelled when {name('format')} is text, got '{layout}'",
            _origin(origins, (block, "layout")),
        )
    if layout in ("pairs", "triplets"):
        keys = ["anchor_column", "positive_column"] + (["negative_columns"] if layout == "triplets" else [])
        names = [values.get("anchor_column"), values.get("positive_column")]
        if layout == "triplets":
            names += list(values.get("negative_columns") or ())
        repeated = sorted({n for n in names if n is not None and names.count(n) > 1})
        if repeated:
            problems.add(
                f"the {layout} columns must be distinct, but {', '.join(map(repr, repeated))} is named "
                f"twice among {', '.join(name(k) for k in keys)}",
                _origin(origins, (block, "layout")),
            )


def source_from_options(
    given: dict[str, Any], option_names: dict[str, str], base: SourceConfig | None = None
) -> SourceConfig:
    """A SourceConfig from command-line source options, checked like a curriculum's block.

    `given` maps SourceConfig fields to what was typed (None: not given; `load_dataset` is a list of
    KEY=VALUE strings). Without a `source`, the options change `base` (a run's saved eval block)."""
    problems = _Problems("command line")
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
                parsed[item.strip()] = _parse_override_value(raw)
            value = parsed
        try:
            values[key] = _SOURCE_KEYS[key](value, value if isinstance(value, str) else None)
        except schema.Invalid as invalid:
            problems.add(f"{option_names[key]} must be {invalid.expected}, got {_show(value)}{invalid.hint}")
    if "source" not in values:
        problems.add(f"{option_names['source']} is required here")
    _check_source_block("", values, {}, problems, name=lambda key: option_names[key])
    if problems.messages:
        raise ConfigError(problems.messages)
    return SourceConfig(**values)


_EVERY_UNKNOWN = -1


def _check_until(
    raw: dict, steps: int | None, eval_every: int | None, label: str, index: int, origins: dict, problems: _Problems
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
            f"{label}: until must set at least one condition ({', '.join(CONDITIONS)})", _origin(origins, key_path)
        )
    if steps is not None:
        values.setdefault("min_steps", default_min_steps(steps))
        if values["min_steps"] > steps:
            problems.add(
                f"{label}: until.min_steps must be at most steps ({steps}), got {values['min_steps']}",
                _origin(origins, (*key_path, "min_steps")) or _origin(origins, ("phases", index, "steps")),
            )
    if values.get("eval_plateau") is not None and eval_every != _EVERY_UNKNOWN:
        origin = _origin(origins, (*key_path, "eval_plateau"))
        if not eval_every:
            problems.add(
                f"{label}: until.eval_plateau needs held-out evals inside the phase: set eval.every "
                f"(and an eval block), got {'no eval block' if eval_every is None else 'eval.every 0'}",
                origin,
            )
    if len(problems.messages) > before:
        return None
    return UntilConfig(**values)


def _check_phases(
    tree: dict,
    train: dict,
    group: tuple[int, str] | None,
    origins: dict,
    problems: _Problems,
    eval_every: int | None = None,
) -> list[dict] | None:
    """`group`: the rows one class brings to a batch and how messages name them (None: unknown)."""
    raw_phases = tree.get("phases")
    if raw_phases is None:
        problems.add("missing required key 'phases' (a non-empty list of phases)")
        return None
    if not isinstance(raw_phases, list) or not raw_phases:
        problems.add(
            f"phases must be a non-empty list of phases, got {_show(raw_phases)}", _origin(origins, ("phases",))
        )
        return None
    phases, first_index_of = [], {}
    for index, raw_phase in enumerate(raw_phases):
        label = _phase_label(index, raw_phase)
        if not isinstance(raw_phase, dict):
            problems.add(
                f"{label}: must be a mapping with name, mining, batch_size and steps, got {_show(raw_phase)}",
                _origin(origins, ("phases", index)),
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
        if _chunking_conflict(values):
            problems.add(
                f"{label}: set chunk_size (rows per chunk) or chunk_tokens (a token budget), not both, "
                f"got chunk_size {values['chunk_size']} and chunk_tokens {_show(values['chunk_tokens'])}",
                _origin(origins, ("phases", index, "chunk_tokens")),
            )
        elif "chunk_size" in values and "chunk_tokens" not in values:
            values["chunk_tokens"] = None  # the phase's row count wins over the train block's budget
        elif "chunk_tokens" in values and "chunk_size" not in values:
            values["chunk_size"] = "auto"  # and its budget over the train block's row count
        for key, train_key in PHASE_KEYS_FROM_TRAIN.items():
            if key not in values and train_key in train:
                values[key] = train[train_key]
        if values.get("until") is not None:
            values["until"] = _check_until(
                values["until"], values.get("steps"), eval_every, label, index, origins, problems
            )
        batch_size = values.get("batch_size")
        batch_origin = _origin(origins, ("phases", index, "batch_size"))
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
                _origin(origins, ("phases", index, "name")),
            )
        elif name is not None:
            first_index_of[name] = index
        phases.append(values)
    return phases


def _check_tree(tree: Any, path: str, origins: dict, problems: _Problems) -> Curriculum | None:
    if tree is None:
        problems.add("the curriculum is empty: expected model, data, train and phases")
        return None
    if not isinstance(tree, dict):
        problems.add(
            f"expected a mapping with model, data, train, phases (and optional eval) at the top, got {_show(tree)}"
        )
        return None
    for key in tree:
        if key not in TOP_KEYS:
            problems.add(_unknown_key(str(key), TOP_KEYS), _origin(origins, (key,)))
    file_dir = os.path.dirname(os.path.abspath(path))
    model, _ = _check_block(tree, "model", file_dir, origins, problems)
    data, invalid_data = _check_block(tree, "data", file_dir, origins, problems)
    _check_source_block("data", data, origins, problems)
    train, _ = _check_block(tree, "train", file_dir, origins, problems)
    if _chunking_conflict(train):
        problems.add(
            f"train: set chunk_size (rows per chunk) or chunk_tokens (a token budget), not both, got "
            f"chunk_size {train['chunk_size']} and chunk_tokens {_show(train['chunk_tokens'])}",
            _origin(origins, ("train", "chunk_tokens")),
        )
    evaluation, invalid_eval = None, set()
    if tree.get("eval") is not None:
        evaluation, invalid_eval = _check_block(tree, "eval", file_dir, origins, problems)
        _check_source_block("eval", evaluation, origins, problems)
    samples_per_class = None if "samples_per_class" in invalid_data else data["samples_per_class"]
    why = {"pairs": "each pair is its own class", "triplets": "each row's anchor and positive are its class"}
    if data["layout"] in why and samples_per_class not in (2, None):
        problems.add(
            f"data.samples_per_class must be 2 when data.layout is {data['layout']} ({why[data['layout']]}), "
            f"got {samples_per_class}",
            _origin(origins, ("data", "samples_per_class")) or _origin(origins, ("data", "layout")),
        )
    if train.get("keep_best") is not None and evaluation is None:
        problems.add(
            f"train.keep_best ({train['keep_best']}) needs an eval block: the best model is judged on held-out data",
            _origin(origins, ("train", "keep_best")),
        )
    eval_every = evaluation["every"] if evaluation is not None else None
    if "every" in invalid_eval:
        eval_every = _EVERY_UNKNOWN  # already reported: no second error about it
    group = None if samples_per_class is None else (samples_per_class, "data.samples_per_class")
    if data["layout"] == "triplets" and "negative_columns" not in invalid_data:
        negatives = len(data["negative_columns"])
        group = (
            2 + negatives,
            f"the rows of one triplet group (anchor, positive and {negatives} negative{'s' if negatives > 1 else ''})",
        )
    phases = _check_phases(tree, train, group, origins, problems, eval_every)
    if phases and "max_buffered_rows" not in invalid_data:
        largest = max((p.get("batch_size") or 0 for p in phases), default=0)
        if data["max_buffered_rows"] < largest:
            problems.add(
                f"data.max_buffered_rows must be at least the largest phase batch_size ({largest}) so a whole "
                f"batch fits in the buffers, got {data['max_buffered_rows']}",
                _origin(origins, ("data", "max_buffered_rows")),
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


# --------------------------------------------------------------------------------------------
# Public API.


def load_curriculum(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Curriculum:
    """Read, override and check a curriculum; raise ConfigError listing every problem found.

    Pure: it reads the one file and touches neither the network nor any path named inside it.
    """
    label = str(path)
    problems = _Problems(label)
    tree = _read_yaml(label, problems)
    origins: dict[tuple, _Override] = {}
    if isinstance(tree, dict):
        for text in overrides:
            _apply_override(tree, text, origins, problems)
    curriculum = _check_tree(tree, label, origins, problems)
    if problems.messages or curriculum is None:
        raise ConfigError(problems.messages)
    return curriculum


def load_eval_block(path: str | os.PathLike) -> EvalConfig | None:
    """Only the `eval` block of a curriculum (the copy saved with a run), checked like `load_curriculum`
    checks it; None when there is none. The rest of the file is not needed to re-run the evaluation."""
    label = str(path)
    problems = _Problems(label)
    tree = _read_yaml(label, problems)
    if not isinstance(tree, dict) or tree.get("eval") is None:
        return None
    values, _ = _check_block(tree, "eval", os.path.dirname(os.path.abspath(label)), {}, problems)
    _check_source_block("eval", values, {}, problems)
    if problems.messages:
        raise ConfigError(problems.messages)
    return EvalConfig(**values)


def plain(value: Any) -> Any:
    """Dataclasses -> dicts (without `Curriculum.path`), tuples -> lists: what yaml.safe_dump and
    json accept. The one conversion of a curriculum, or a dict of one, to plain data."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "path"}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def curriculum_to_dict(c: Curriculum) -> dict:
    """The curriculum as run: every key explicit, paths already resolved, plain YAML-able types.
    `load_curriculum` of its YAML dump gives an equal Curriculum (checkpoints rely on that)."""
    result = {
        "model": plain(c.model),
        "data": plain(c.data),
        "train": plain(c.train),
        "phases": plain(c.phases),
    }
    if c.eval is not None:
        result["eval"] = plain(c.eval)
    return result
