"""A curriculum's blocks as frozen dataclasses: what to train (model), on which data (data), how
(train), phase by phase (phases), judged on what (eval).

Each key is declared once, as a field of its block's dataclass (`schema.key`: default, check,
required / path flags, help); the tables block_checks.py, phase_checks.py and overrides.py walk are derived from those
fields here. Loading and checking a file is validate.py's job; docs/curricula.md documents every key."""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from tripletctl.config import schema
from tripletctl.config.choices import (
    BATCH_CLASSES,
    DECAYS,
    DEVICES,
    DISTANCES,
    FALLBACKS,
    FORMATS,
    INIT_MODES,
    LOSSES,
    LR_SCALINGS,
    MINING_MODES,
    ON_COLLAPSE,
    ON_NONFINITE,
    OPTIMIZERS,
    PHASE_NAME_CHARS,
    PHASE_NAME_MAX,
    POOLINGS,
    PRECISIONS,
    TRACKERS,
)
from tripletctl.config.layouts import LAYOUT_OF, LAYOUTS
from tripletctl.config.loss_rules import DEFAULT_LOSS
from tripletctl.config.mined_negatives import MinedNegativesConfig, check_mined_negatives
from tripletctl.config.until import EVAL_METRICS, Plateau, UntilConfig

# Keys of data.load_dataset that tripletctl passes itself: a second value would be a TypeError
# deep inside `datasets`, so they are refused here with a pointer to the key that sets them.
RESERVED_LOAD_DATASET_KEYS = {
    "path": "data.source",
    "split": "data.split",
    "streaming": "tripletctl (training always streams)",
}


def chunking_conflict(values: dict) -> bool:
    """A row count and a token budget together: which one is meant?"""
    return isinstance(values.get("chunk_size"), int) and values.get("chunk_tokens") is not None


def check_phase_name(value: Any, raw: str | None) -> str:
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


def _guard_ratio(value: Any, raw: str | None) -> float | None:
    if value is None:
        return None
    try:
        return schema.fraction(value, raw)
    except schema.Invalid:
        raise schema.Invalid("a number in (0, 1], e.g. 0.95, or null") from None


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
    unpadded: bool = schema.key(
        False, check=schema.boolean, help="BERT: encode the real tokens only, packed (varlen attention on CUDA)"
    )
    base_model: str | None = schema.key(
        None, check=schema.text(optional=True), help="hub id of a local model folder, for the model card's base_model"
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
        return LAYOUT_OF[self.layout].columns(self)


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
    neighbour_refresh: int = schema.key(
        20, check=schema.integer(1), help="batch_classes neighbours: batches between class-centroid snapshots"
    )

    @property
    def rows_per_group(self) -> int:
        """Rows one class brings to a batch; batch_size is a whole number of these groups."""
        if LAYOUT_OF[self.layout].given_negatives:
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


def _divergence_factor(value: Any, raw: str | None) -> float | None:
    """A jump of at most 1x is every other step: only a factor above 1 detects anything."""
    expected = "a number above 1 (e.g. 100), or null to turn divergence detection off"
    if value is None:
        return None
    try:
        factor = schema.number()(value, raw)
    except schema.Invalid:
        raise schema.Invalid(expected) from None
    if factor <= 1:
        raise schema.Invalid(expected)
    return factor


@dataclass(frozen=True)
class TrainConfig:
    """The run's settings; those marked "default for phases" are what a phase leaves out (PhaseConfig)."""

    optimizer: str = schema.key("adamw", check=schema.choice(OPTIMIZERS), help="the optimiser")
    lr: float = schema.key(2e-5, check=schema.number(), help="peak learning rate (default for phases)")
    lr_scaling: str = schema.key(
        "none", check=schema.choice(LR_SCALINGS), help="a phase's lr × (batch_size / lr_reference_batch)^(1/2 or 1)"
    )
    lr_reference_batch: int | None = schema.key(
        None, check=schema.optional(schema.integer(1)), help="the batch size `lr` is meant for; null: the first phase's"
    )
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
    output_dir: str = schema.key(
        "runs/tripletctl",
        check=schema.local_path(),
        local_path=True,
        help="relative to the current directory; ~ expanded",
    )
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
    compile: bool | str = schema.key(
        "auto", check=schema.bool_or_auto, help="torch.compile the encoder; auto: on CUDA (eager if compiling fails)"
    )
    fused_adamw: bool = schema.key(True, check=schema.boolean, help="on CUDA: AdamW as one fused kernel per step")
    keep_graphs: bool = schema.key(
        True, check=schema.boolean, help="chunks that fit the budget keep their graphs (no re-forward); false: never"
    )
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
    divergence_factor: float | None = schema.key(
        100.0,
        check=_divergence_factor,
        help="a loss, gradient or weight norm this many times its recent median counts as non-finite; null: off",
    )


def from_train(name: str) -> Any:
    """A phase key that defaults to the train block's key `name`: same check, help and default."""
    declared = TrainConfig.__dataclass_fields__[name]
    return dataclasses.field(default=declared.default, metadata={**declared.metadata, "train": name})


@dataclass(frozen=True)
class PhaseConfig:
    """One phase, complete: `load_curriculum` fills every key the file leaves out from the train block
    (the fields declared with `from_train`), so the runner never looks anywhere else."""

    name: str = schema.key(
        check=check_phase_name, required=True, help="names the phase in logs, checkpoints and errors"
    )
    mining: str = schema.key(
        check=schema.choice(MINING_MODES), required=True, help="how triplets are chosen in each batch"
    )
    batch_size: int = schema.key(check=schema.integer(1), required=True, help="rows per step, across all processes")
    steps: int = schema.key(check=schema.integer(1), required=True, help="optimiser steps; with `until`, the most")
    margin: float = schema.key(0.2, check=schema.number(), help="the triplet loss margin (and the yardstick's)")
    loss: str = schema.key(
        DEFAULT_LOSS,
        check=schema.choice(LOSSES),
        help="relu(ap - an + margin), softplus(ap - an), or InfoNCE (losses.py)",
    )
    temperature: float = schema.key(0.05, check=schema.number(), help="infonce: logits are cosine / temperature")
    hardness_alpha: float = schema.key(
        0.0, check=schema.number(positive=False), help="infonce: each negative's logit + α·cosine (no gradient)"
    )
    false_negative_guard: float | None = schema.key(
        None,
        check=_guard_ratio,
        help="ρ: skip negatives with sim(a,n) > ρ·sim(a,p) (guard.py); null = off",
    )
    batch_classes: str = schema.key(
        "random", check=schema.choice(BATCH_CLASSES), help="neighbours: groups of nearby classes share a batch"
    )
    neighbour_share: float = schema.key(
        0.5, check=schema.fraction, help="batch_classes neighbours: share of a batch's classes in neighbour groups"
    )
    neighbour_group: int = schema.key(4, check=schema.integer(2), help="batch_classes neighbours: classes a group")
    mined_negatives: MinedNegativesConfig | None = schema.key(
        None, check=check_mined_negatives, help="negatives mined from a corpus pool at phase start; None = off"
    )
    lr: float = from_train("lr")
    warmup_steps: int = from_train("warmup_steps")
    distance: str = from_train("distance")
    fallback: str = from_train("fallback")
    chunk_size: int | str = from_train("chunk_size")
    chunk_tokens: int | str | None = from_train("chunk_tokens")
    on_collapse: str = from_train("on_collapse")
    until: UntilConfig | None = schema.key(
        None,
        check=schema.mapping("a mapping of end conditions, e.g. {active_fraction_below: 0.05}, or null"),
        help="end conditions; `steps` is then the maximum (conditions.py)",
    )
    memory: MemoryConfig | None = from_train("memory")
    on_nonfinite: str = from_train("on_nonfinite")


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


BLOCKS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


TOP_KEYS = tuple(f.name for f in dataclasses.fields(Curriculum) if f.name != "path")


BLOCK_KEYS: dict[str, dict[str, schema.Check]] = {block: schema.checks(cls) for block, cls in BLOCKS.items()}


PHASE_KEYS: dict[str, schema.Check] = schema.checks(PhaseConfig)


PHASE_KEYS_FROM_TRAIN = {f.name: f.metadata["train"] for f in dataclasses.fields(PhaseConfig) if "train" in f.metadata}


UNTIL_KEYS: dict[str, schema.Check] = schema.checks(UntilConfig)


# `until.plateau` / `until.eval_plateau`: the Plateau keys, with the metric names of that condition
PLATEAU_KEYS: dict[str, dict[str, schema.Check]] = {
    f.name: {**schema.checks(Plateau), "metric": schema.choice(f.metadata["metrics"])}
    for f in dataclasses.fields(UntilConfig)
    if "metrics" in f.metadata
}


SOURCE_KEYS = schema.checks(SourceConfig)


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
