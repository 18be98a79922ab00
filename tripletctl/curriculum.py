"""A curriculum: the YAML file that says what to train, on which data, and how hard to mine, phase
by phase.

Loading turns the file plus `key=value` overrides into frozen dataclasses and checks every value
before any work starts. All problems are reported together, each naming the file, the phase and the
key, so a long run never dies on a typo in phase 3 and a user fixes everything in one edit.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tripletctl.conditions import (
    COMBINE,
    CONDITIONS,
    EVAL_METRICS,
    STEP_METRICS,
    Plateau,
    UntilConfig,
    default_min_steps,
)
from tripletctl.conditions import describe as describe_until
from tripletctl.errors import ConfigError

MINING_MODES = ("random", "semi-hard", "hard-negative", "batch-hard", "batch-all")
INIT_MODES = ("pretrained", "config")
POOLINGS = ("mean", "cls")
FORMATS = ("json", "parquet", "csv", "text")
LAYOUTS = ("labelled", "pairs", "triplets")
OPTIMIZERS = ("adamw",)
DECAYS = ("none", "linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
DISTANCES = ("euclidean", "squared-euclidean")
FALLBACKS = ("hardest", "easiest")
ON_COLLAPSE = ("warn", "stop", "fallback")
TRACKERS = ("tensorboard", "wandb", "mlflow")  # train.report_to; see tripletctl/trackers.py
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


@dataclass(frozen=True)
class ModelConfig:
    name: str  # hub name or local directory
    init: str = "pretrained"  # "pretrained" | "config" (random weights from config.json, seeded by train.seed)
    tokenizer: str | None = None  # defaults to `name`
    pooling: str = "mean"  # "mean" | "cls"
    head: tuple[int, ...] = ()  # MLP layer sizes after pooling; () = no head
    normalize: bool = True  # project to the unit sphere
    attn_implementation: str = "sdpa"  # passed to transformers unchanged, e.g. "flash_attention_2" (unpadded)


@dataclass(frozen=True)
class SourceConfig:
    """Where rows come from and what a row is: the one description of a source, shared by the `data`
    and `eval` blocks, `tripletctl eval` / `inspect-collapse` options and the readers in data.py.
    Layouts (docs/data.md): labelled = text + class label; pairs = anchor + positive, each pair its
    own class; triplets = anchor + positive + given negatives (negatives of every anchor in a batch)."""

    source: str | dict[str, str]  # hub name, local file / dir / glob; for format "text": {label: glob}
    format: str | None = None  # "json" | "parquet" | "csv" | "text" | None (auto: extension, else hub)
    split: str = "train"
    layout: str = "labelled"  # "labelled" | "pairs" | "triplets"
    text_column: str = "text"  # labelled
    label_column: str = "label"  # labelled
    anchor_column: str = "anchor"  # pairs, triplets
    positive_column: str = "positive"  # pairs, triplets
    negative_columns: tuple[str, ...] = ("negative",)  # triplets: e.g. [negative_1, negative_2, negative_3]
    load_dataset: dict = field(default_factory=dict)  # extra kwargs, passed unchanged to datasets.load_dataset

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


@dataclass(frozen=True)
class DataConfig(SourceConfig):
    """The training source plus how it is streamed, batched and tokenised."""

    shuffle_buffer: int = 10_000
    max_length: int = 128  # tokens
    samples_per_class: int = 4
    max_buffered_rows: int = 200_000  # bound on all per-class buffers together
    tokenizer_workers: int = 1  # worker processes that tokenise (0 = in the main process)
    prefetch_batches: int = 2

    @property
    def rows_per_group(self) -> int:
        """Rows one class brings to a batch; batch_size is a whole number of these groups."""
        if self.layout == "triplets":
            return 2 + len(self.negative_columns)
        return self.samples_per_class


@dataclass(frozen=True)
class MemoryConfig:
    """Cross-batch memory (docs/mining.md): the last `size` embeddings join every step's candidates
    from the phase's step `start_step` on (the queue fills from step 0)."""

    size: int
    start_step: int = 0


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adamw"
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 100  # per phase
    decay: str = "linear"  # "none" | "linear" | "cosine" to 0 at the end of each phase
    grad_clip: float = 1.0  # 0 disables
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "fp32" | "bf16"
    seed: int = 0
    output_dir: str = "runs/tripletctl"
    checkpoint_every: int = 0  # steps; 0 = only at the end of each phase (and on Ctrl-C/SIGTERM)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    chunk_size: int | str = "auto"  # rows per forward chunk (gradient caching); "auto": a token budget
    chunk_tokens: int | str | None = None  # padded tokens per length-sorted chunk; "auto" fits free memory
    compile: bool = False  # torch.compile the encoder
    distance: str = "euclidean"  # "euclidean" | "squared-euclidean" (default for phases)
    fallback: str = "hardest"  # semi-hard fallback "hardest" | "easiest" (default for phases)
    on_collapse: str = "warn"  # "warn" | "stop" | "fallback" (default for phases)
    collapse_patience: int = 50  # consecutive steps
    collapse_tolerance: float = 0.1  # relative to the margin
    memory: MemoryConfig | None = None  # cross-batch memory (default for phases); None = off
    log_every: int | str = "auto"  # plain progress lines (stdout not a terminal): every N steps, or "auto"
    report_to: tuple[str, ...] = ()  # experiment trackers, any of TRACKERS
    keep_best: str | None = None  # an EVAL_METRICS name: keep the best held-out model under OUTPUT/best
    on_nonfinite: str = "stop"  # "stop" | "skip" a step whose loss or gradient is NaN/inf (default for phases)
    max_nonfinite_skips: int = 10  # skip: stop after this many non-finite steps in a row


@dataclass(frozen=True)
class PhaseConfig:
    """One phase, complete: `load_curriculum` fills every override the file leaves out from the
    train block, so the runner never looks anywhere else. The defaults below only make hand-built
    phases (in tests) convenient; they mirror TrainConfig's."""

    name: str
    mining: str  # one of MINING_MODES
    batch_size: int
    steps: int
    margin: float = 0.2
    lr: float = TrainConfig.lr
    warmup_steps: int = TrainConfig.warmup_steps
    distance: str = TrainConfig.distance
    fallback: str = TrainConfig.fallback
    chunk_size: int | str = TrainConfig.chunk_size
    chunk_tokens: int | str | None = TrainConfig.chunk_tokens
    on_collapse: str = TrainConfig.on_collapse
    until: UntilConfig | None = None  # end conditions; `steps` is then the maximum (conditions.py)
    memory: MemoryConfig | None = TrainConfig.memory
    on_nonfinite: str = TrainConfig.on_nonfinite


@dataclass(frozen=True)
class EvalConfig(SourceConfig):
    """The held-out source plus how much of it to read and when."""

    max_rows: int = 2000
    every: int = 0  # also evaluate every N steps inside a phase; 0 = phase ends only
    batch_size: int = 256


@dataclass(frozen=True)
class Curriculum:
    path: str = field(compare=False)  # the file it came from, for messages; not part of equality
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    phases: tuple[PhaseConfig, ...]
    eval: EvalConfig | None = None


# --------------------------------------------------------------------------------------------
# Value checks. Each takes the value (as YAML typed it) and, for a key set by an override, the raw
# text after '=', and returns the value converted to the key's type or raises _Invalid.


class _Invalid(Exception):
    """A value that does not fit its key: what was expected, plus an optional did-you-mean hint."""

    def __init__(self, expected: str, hint: str = ""):
        super().__init__(expected)
        self.expected = expected
        self.hint = hint


_Check = Callable[[Any, "str | None"], Any]


def _is_scalar(value: Any) -> bool:
    return value is not None and not isinstance(value, (str, list, dict))


def _integer(minimum: int = 1, maximum: int | None = None) -> _Check:
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
            raise _Invalid(expected)
        return value

    return check


def _number(positive: bool = True) -> _Check:
    expected = "a positive number" if positive else "a non-negative number"

    def check(value: Any, raw: str | None) -> float:
        if isinstance(value, str):  # PyYAML reads `3e-5` (no dot) as a string, so parse it here
            try:
                value = float(value)
            except ValueError:
                raise _Invalid(expected) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Invalid(expected)
        if value < 0 or (positive and value == 0):
            raise _Invalid(expected)
        return float(value)

    return check


def _boolean(value: Any, raw: str | None) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("true or false")
    return value


def _text(optional: bool = False) -> _Check:
    expected = "a non-empty string or null" if optional else "a non-empty string"

    def check(value: Any, raw: str | None) -> str | None:
        if value is None and optional:
            return None
        if raw is not None and _is_scalar(value):  # `data.split=2020` on the command line means the text
            value = raw
        if not isinstance(value, str) or not value.strip():
            raise _Invalid(expected)
        return value

    return check


def _phase_name(value: Any, raw: str | None) -> str:
    """It names the phase's directory (phase-K-NAME) and appears in every message: a short, safe name."""
    value = _text()(value, raw)
    if len(value) > PHASE_NAME_MAX or not set(value) <= PHASE_NAME_CHARS or value in (".", ".."):
        raise _Invalid(
            f"a name of at most {PHASE_NAME_MAX} letters, digits, '.', '_', '+' or '-' (it becomes a directory name)"
        )
    return value


def _did_you_mean(value: Any, options: Sequence[str]) -> str:
    if not isinstance(value, str):
        return ""
    matches = difflib.get_close_matches(value.lower(), options, n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def _choice(options: tuple[str, ...], optional: bool = False) -> _Check:
    expected = "one of " + ", ".join(options) + (" or null" if optional else "")

    def check(value: Any, raw: str | None) -> str | None:
        if value is None and optional:
            return None
        if isinstance(value, str) and value in options:
            return value
        raise _Invalid(expected, _did_you_mean(value, options))

    return check


def _optional(check: _Check) -> _Check:
    def optional(value: Any, raw: str | None) -> Any:
        return None if value is None else check(value, raw)

    return optional


def _fraction(value: Any, raw: str | None) -> float:
    value = _number()(value, raw)
    if value > 1:
        raise _Invalid("a number in (0, 1]")
    return value


def _relative_delta(value: Any, raw: str | None) -> float:
    try:
        value = _number(positive=False)(value, raw)
    except _Invalid:
        raise _Invalid("a relative improvement in [0, 1), e.g. 0.01 for 1%") from None
    if value >= 1:
        raise _Invalid("a relative improvement in [0, 1), e.g. 0.01 for 1%")
    return value


def _mapping(expected: str) -> _Check:
    def check(value: Any, raw: str | None) -> dict | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise _Invalid(expected)
        return dict(value)

    return check


def _int_or_auto(value: Any, raw: str | None) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise _Invalid("a positive integer or 'auto'")


def _int_or_auto_or_null(value: Any, raw: str | None) -> int | str | None:
    if value is None:
        return None
    return _int_or_auto(value, raw)


def _chunking_conflict(values: dict) -> bool:
    """A row count and a token budget together: which one is meant?"""
    return isinstance(values.get("chunk_size"), int) and values.get("chunk_tokens") is not None


def _trackers(value: Any, raw: str | None) -> tuple[str, ...]:
    """A list of tracker names; a single name or `none` as a convenience (HF Trainer accepts both)."""
    if value is None or value == "none":
        return ()
    names = [value] if isinstance(value, str) else value
    expected = "a list of trackers from " + ", ".join(TRACKERS) + " (or [] / none)"
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _Invalid(expected)
    for name in names:
        if name not in TRACKERS:
            raise _Invalid(expected, _did_you_mean(name, TRACKERS))
    if len(set(names)) != len(names):
        raise _Invalid(expected + ", each at most once")
    return tuple(names)


def _layer_sizes(value: Any, raw: str | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        return tuple(value)
    raise _Invalid("a list of positive integers (layer sizes), e.g. [256, 128]")


_MEMORY_EXPECTED = "null or a mapping {size: M, start_step: S} (M a positive integer, S a non-negative integer)"


def _memory(value: Any, raw: str | None) -> MemoryConfig | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _Invalid(_MEMORY_EXPECTED)
    unknown = [k for k in value if k not in ("size", "start_step")]
    if unknown:
        matches = difflib.get_close_matches(str(unknown[0]), ("size", "start_step"), n=1, cutoff=0.6)
        suggestion = f"; did you mean '{matches[0]}'?" if matches else ""
        raise _Invalid(_MEMORY_EXPECTED, f" (unknown key '{unknown[0]}'{suggestion})")
    if "size" not in value:
        raise _Invalid(_MEMORY_EXPECTED, " (size is missing)")
    try:
        size = _integer(1)(value["size"], None)
        start_step = _integer(0)(value.get("start_step", 0), None)
    except _Invalid:
        raise _Invalid(_MEMORY_EXPECTED) from None
    return MemoryConfig(size=size, start_step=start_step)


def _source(value: Any, raw: str | None) -> str | dict[str, str]:
    if raw is not None and _is_scalar(value):
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
    raise _Invalid("a hub dataset name, a local file, directory or glob, or a {label: glob} mapping")


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
    raise _Invalid("a non-empty list of distinct column names, e.g. [negative_1, negative_2]")


def _load_dataset_kwargs(value: Any, raw: str | None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
        raise _Invalid("a mapping of keyword arguments for datasets.load_dataset")
    for key, owner in RESERVED_LOAD_DATASET_KEYS.items():
        if key in value:
            raise _Invalid(f"free of '{key}', which is set by {owner}")
    return copy.deepcopy(value)  # the curriculum owns its copy: nothing outside can mutate it


# --------------------------------------------------------------------------------------------
# The schema: which keys each block accepts and how each value is checked. Field order and
# defaults come from the dataclasses above; tests check both agree.

_SOURCE_KEYS: dict[str, _Check] = {
    "source": _source,
    "format": _choice(FORMATS, optional=True),
    "split": _text(),
    "layout": _choice(LAYOUTS),
    "text_column": _text(),
    "label_column": _text(),
    "anchor_column": _text(),
    "positive_column": _text(),
    "negative_columns": _column_names,
    "load_dataset": _load_dataset_kwargs,
}

BLOCK_KEYS: dict[str, dict[str, _Check]] = {
    "model": {
        "name": _text(),
        "init": _choice(INIT_MODES),
        "tokenizer": _text(optional=True),
        "pooling": _choice(POOLINGS),
        "head": _layer_sizes,
        "normalize": _boolean,
        "attn_implementation": _text(),
    },
    "data": {
        **_SOURCE_KEYS,
        "shuffle_buffer": _integer(1),
        "max_length": _integer(1),
        "samples_per_class": _integer(2),
        "max_buffered_rows": _integer(1),
        "tokenizer_workers": _integer(0),
        "prefetch_batches": _integer(1),
    },
    "train": {
        "optimizer": _choice(OPTIMIZERS),
        "lr": _number(),
        "weight_decay": _number(positive=False),
        "warmup_steps": _integer(0),
        "decay": _choice(DECAYS),
        "grad_clip": _number(positive=False),
        "precision": _choice(PRECISIONS),
        "seed": _integer(0, 2**32 - 1),  # torch.manual_seed's range; the per-step mining seed derives from it
        "output_dir": _text(),
        "checkpoint_every": _integer(0),
        "device": _choice(DEVICES),
        "chunk_size": _int_or_auto,
        "chunk_tokens": _int_or_auto_or_null,
        "compile": _boolean,
        "distance": _choice(DISTANCES),
        "fallback": _choice(FALLBACKS),
        "on_collapse": _choice(ON_COLLAPSE),
        "collapse_patience": _integer(1),
        "collapse_tolerance": _number(positive=False),
        "memory": _memory,
        "log_every": _int_or_auto,
        "report_to": _trackers,
        "keep_best": _choice(EVAL_METRICS, optional=True),
        "on_nonfinite": _choice(ON_NONFINITE),
        "max_nonfinite_skips": _integer(1),
    },
    "eval": {
        **_SOURCE_KEYS,
        "max_rows": _integer(1),
        "every": _integer(0),
        "batch_size": _integer(1),
    },
}

PHASE_KEYS: dict[str, _Check] = {
    "name": _phase_name,
    "mining": _choice(MINING_MODES),
    "batch_size": _integer(1),
    "steps": _integer(1),
    "margin": _number(),
    "lr": BLOCK_KEYS["train"]["lr"],
    "warmup_steps": BLOCK_KEYS["train"]["warmup_steps"],
    "distance": BLOCK_KEYS["train"]["distance"],
    "fallback": BLOCK_KEYS["train"]["fallback"],
    "chunk_size": BLOCK_KEYS["train"]["chunk_size"],
    "chunk_tokens": BLOCK_KEYS["train"]["chunk_tokens"],
    "on_collapse": BLOCK_KEYS["train"]["on_collapse"],
    "until": _mapping("a mapping of end conditions, e.g. {active_fraction_below: 0.05}, or null"),
    "memory": BLOCK_KEYS["train"]["memory"],
    "on_nonfinite": BLOCK_KEYS["train"]["on_nonfinite"],
}

# `until:` (checked by _check_until once the phase's steps and eval.every are known)
UNTIL_KEYS: dict[str, _Check] = {
    "min_steps": _integer(1),
    "window": _integer(1),
    "combine": _choice(COMBINE),
    "active_fraction_below": _optional(_fraction),
    "loss_below": _optional(_number()),
    "batch_hard_loss_below": _optional(_number()),
    "plateau": _mapping("a mapping {metric, patience, min_delta}, or null"),
    "eval_plateau": _mapping("a mapping {metric, patience, min_delta}, or null"),
}
PLATEAU_KEYS: dict[str, dict[str, _Check]] = {
    "plateau": {"metric": _choice(STEP_METRICS), "patience": _integer(1), "min_delta": _relative_delta},
    "eval_plateau": {"metric": _choice(EVAL_METRICS), "patience": _integer(1), "min_delta": _relative_delta},
}

# Phase keys that default to the train block's value rather than to a constant.
PHASE_KEYS_FROM_TRAIN = (
    "lr",
    "warmup_steps",
    "distance",
    "fallback",
    "chunk_size",
    "chunk_tokens",
    "on_collapse",
    "memory",
    "on_nonfinite",
)

TOP_KEYS = ("model", "data", "train", "phases", "eval")
_REQUIRED = {"model": ("name",), "data": ("source",), "train": (), "eval": ("source",)}
_PHASE_REQUIRED = ("name", "mining", "batch_size", "steps")
_PATH_KEYS = {"model": ("name", "tokenizer"), "data": ("source",), "eval": ("source",), "train": ()}
_CLASSES = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


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
    except _Invalid:
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


def _defaults(cls: type) -> dict[str, Any]:
    values = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return values


def _check_keys(
    raw: dict,
    checks: dict[str, _Check],
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
        except _Invalid as invalid:
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
        return _defaults(_CLASSES[block]), set(BLOCK_KEYS[block])
    values = _check_keys(
        raw,
        BLOCK_KEYS[block],
        _REQUIRED[block],
        context="",
        qualifier=f"{block}.",
        key_path=(block,),
        origins=origins,
        problems=problems,
    )
    for key in _PATH_KEYS[block]:
        if key in values:
            base_dir = os.getcwd() if _origin(origins, (block, key)) else file_dir
            values[key] = _resolve_path(values[key], base_dir)
    invalid = {key for key in raw if key in BLOCK_KEYS[block] and key not in values}
    return {**_defaults(_CLASSES[block]), **values}, invalid


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
        except _Invalid as invalid:
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
                ("metric", "patience"),
                context=f"{label}: ",
                qualifier=f"until.{name}.",
                key_path=(*key_path, name),
                origins=origins,
                problems=problems,
            )
            values[name] = Plateau(**checked) if {"metric", "patience"} <= set(checked) else None
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
            _PHASE_REQUIRED,
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
        for key in PHASE_KEYS_FROM_TRAIN:
            if key not in values and key in train:
                values[key] = train[key]
        values.setdefault("margin", PhaseConfig.margin)
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


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "path"}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def curriculum_to_dict(c: Curriculum) -> dict:
    """The curriculum as run: every key explicit, paths already resolved, plain YAML-able types.
    `load_curriculum` of its YAML dump gives an equal Curriculum (checkpoints rely on that)."""
    result = {
        "model": _plain(c.model),
        "data": _plain(c.data),
        "train": _plain(c.train),
        "phases": _plain(c.phases),
    }
    if c.eval is not None:
        result["eval"] = _plain(c.eval)
    return result


def describe_source(source: str | dict[str, str]) -> str:
    if isinstance(source, dict):
        return "{" + ", ".join(f"{label}: {glob}" for label, glob in source.items()) + "}"
    return source


def _describe_chunks(phase: PhaseConfig) -> str:
    if isinstance(phase.chunk_size, int) and phase.chunk_tokens is None:
        return f"{phase.chunk_size} rows each"
    if isinstance(phase.chunk_tokens, int):
        return f"length-sorted, {phase.chunk_tokens:,} tokens each"
    return "length-sorted, auto token budget"


def _describe_layout(data: DataConfig) -> str:
    """What one group of a batch is, so the `groups` column reads right."""
    if data.layout == "triplets":
        n = len(data.negative_columns)
        return (
            f"triplets: a group is one row's anchor, positive and {n} negative{'s' if n > 1 else ''}, "
            f"{data.rows_per_group} texts"
        )
    if data.layout == "pairs":
        return "pairs: a group is one row's anchor and positive, 2 texts"
    return f"labelled, {data.samples_per_class} per class"


def plan_table(c: Curriculum) -> Table:
    """What `validate` prints: one row per phase, with the samples each phase will see."""
    # No vertical rules and folding instead of "…": a full plan fits an 80-column pipe unabridged.
    table = Table(
        title=escape(f"{c.path}: {len(c.phases)} phases"),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 1),
        collapse_padding=True,
        pad_edge=False,
    )
    # pairs and triplets: batch_size counts rows embedded, so also show the rows (groups) read per batch
    groups = c.data.layout != "labelled"
    for header, justify in [
        ("#", "right"),
        ("phase", "left"),
        ("mining", "left"),
        ("batch", "right"),
        *([("groups", "right")] if groups else []),
        ("margin", "right"),
        ("steps", "right"),
        ("samples", "right"),
        ("lr", "right"),
        ("distance", "left"),
    ]:
        table.add_column(header, justify=justify, overflow="fold")
    with_memory = any(p.memory is not None for p in c.phases)
    if with_memory:  # only then: plans without a memory print as they always did
        table.add_column("memory", justify="right", overflow="fold")
    for index, phase in enumerate(c.phases):
        at_most = "≤" if phase.until else ""  # conditions may end the phase earlier
        memory = (
            []
            if not with_memory
            else ["-" if phase.memory is None else f"{phase.memory.size:,} from step {phase.memory.start_step:,}"]
        )
        table.add_row(
            str(index),
            escape(phase.name),
            phase.mining,
            f"{phase.batch_size:,}",
            *([f"{phase.batch_size // c.data.rows_per_group:,}"] if groups else []),
            f"{phase.margin:g}",
            f"{at_most}{phase.steps:,}",
            f"{at_most}{phase.batch_size * phase.steps:,}",
            f"{phase.lr:g}",
            phase.distance,
            *memory,
        )
    total_steps = sum(p.steps for p in c.phases)
    total_samples = sum(p.batch_size * p.steps for p in c.phases)
    lines = [
        f"until: phase {index} ({phase.name}) ends early {describe_until(phase.until)}"
        for index, phase in enumerate(c.phases)
        if phase.until
    ] + [
        f"model: {c.model.name} ({c.model.init}, {c.model.pooling} pooling"
        + (f", head {list(c.model.head)}" if c.model.head else "")
        + ")",
        f"data: {describe_source(c.data.source)} (split {c.data.split}, {_describe_layout(c.data)})",
    ]
    if c.eval is not None:
        every = f"every {c.eval.every} steps and " if c.eval.every else ""
        lines.append(
            f"eval: {describe_source(c.eval.source)} (split {c.eval.split}, {c.eval.layout}, {every}at phase ends)"
        )
    chunks = [_describe_chunks(p) for p in c.phases]
    lines.append(
        "chunks: "
        + (chunks[0] if len(set(chunks)) == 1 else ", ".join(f"{i}: {text}" for i, text in enumerate(chunks)))
    )
    if c.train.keep_best:
        lines.append(f"keep best: highest held-out {c.train.keep_best} -> {c.train.output_dir}/best")
    modes = sorted({p.on_nonfinite for p in c.phases})
    lines.append(
        "non-finite loss or gradient: "
        + " / ".join(
            f"skip (stop after {c.train.max_nonfinite_skips} in a row)" if m == "skip" else "stop (exit 4)"
            for m in modes
        )
    )
    lines += [
        f"output: {c.train.output_dir}"
        + (f" (reported to {', '.join(c.train.report_to)})" if c.train.report_to else ""),
        f"total: {'at most ' if any(p.until for p in c.phases) else ''}{total_steps:,} steps, "
        f"{total_samples:,} samples",
    ]
    # caption lines are not wrapped at the table's width: a long path stays one line (print with
    # crop=False so a terminal narrower than a line wraps it itself rather than rich cutting it)
    table.caption = Text("\n".join(lines), no_wrap=True, overflow="ignore")
    return table
