"""`tripletctl init`: from a labelled corpus and a model to a curriculum `train` runs with no edit.

Reads a bounded sample of the data (data/survey.py), looks at the model folder (config/model_folder.py),
holds out whole classes past 4 passes (or, with few classes, rows of every class: config/sizing.py
`holds_out`, `hold_out`), sizes the run (`size_run`, the one rule, docs/init.md) and writes the
commented curriculum (config/starter.py) with its train and held-out files beside it, then loads it
back as `validate` would: a file init writes and `validate` refuses is a bug, and nothing of it is
left behind.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tripletctl.config.blocks import SourceConfig
from tripletctl.config.choices import POOLINGS
from tripletctl.config.layouts import LAYOUT_OF
from tripletctl.config.model_folder import FolderFacts, folder_facts
from tripletctl.config.sizing import (
    HOLD_OUT_MAX_ROWS,
    OVER_TRAIN_PASSES,
    HoldOut,
    Sizing,
    default_budget,
    hold_out,
    holds_out,
    learning_rate,
    max_length_for,
    passes,
    size_run,
)
from tripletctl.config.starter import Commented, render
from tripletctl.config.validate import load_curriculum
from tripletctl.core.errors import ConfigError, TripletctlError, one_line, writing
from tripletctl.core.jsonio import replace_text
from tripletctl.data.header import FactsReader
from tripletctl.data.sources import resolve
from tripletctl.data.survey import SAMPLE_ROWS, Survey, split_rows, survey, write_rows


@dataclass(frozen=True)
class InitResult:
    """What `init` wrote and said (tripletctl.init returns it)."""

    curriculum: Path  # the file written
    files: tuple[Path, ...]  # every file written (the curriculum first, then the data files)
    lines: tuple[str, ...] = ()  # what init found and decided, to print


@dataclass
class _Data:
    """Where training and held-out rows come from once init has decided."""

    train: SourceConfig
    eval: SourceConfig | None
    train_rows: list[list]  # the rows sizing counts
    heldout_texts: int
    written: list[Path]
    said: str  # how the eval block was made: files, a split rule, or the user's held-out source


def _local_path(path: str, base: Path) -> str:
    """A local path as the curriculum must say it: `./…` below the curriculum's own directory (it
    resolves against that directory, so the pair moves together), else absolute."""
    absolute = os.path.abspath(os.path.expanduser(path))
    relative = os.path.relpath(absolute, os.path.abspath(base))
    return absolute if relative.startswith("..") else f"./{relative}"


def _as_written(config: SourceConfig, base: Path) -> SourceConfig:
    """The source as the curriculum file names it (local paths relative to the file)."""
    if isinstance(config.source, dict):
        return _replace(config, source={label: _local_path(glob, base) for label, glob in config.source.items()})
    if resolve(config.source, config.format).hub:
        return config
    return _replace(config, source=_local_path(config.source, base))


def _replace(config: SourceConfig, **changes: Any) -> SourceConfig:
    values = {name: getattr(config, name) for name in SourceConfig.__dataclass_fields__}
    return SourceConfig(**{**values, **changes})


def _file_source(config: SourceConfig, path: Path, base: Path) -> SourceConfig:
    """A JSON-lines file init wrote, with the source's layout and column names."""
    layout_keys = ("layout", "text_column", "label_column", "anchor_column", "positive_column", "negative_columns")
    columns = {key: getattr(config, key) for key in layout_keys}
    if isinstance(config.source, dict):  # plain-text files: written under the text / label names
        columns.update(text_column="text", label_column="label")
    return SourceConfig(source=_local_path(str(path), base), **columns)


def _holdout_for(found: Survey, seed: int) -> HoldOut:
    if found.grouped:  # every row its own class: a share of the rows, as many as a held-out set needs
        count = min(
            len(found.rows) // 5, HOLD_OUT_MAX_ROWS // len(LAYOUT_OF[found.config.layout].columns(found.config))
        )
        return HoldOut("rows", rows={None: max(2, count)})
    return hold_out({label: len(texts) for label, texts in found.class_texts().items()}, seed)


def _no_block(found: Survey, budget: int | None, device: str, keep_block: bool | None) -> str | None:
    """Why nothing of the data is held out, or None to hold a block out. `keep_block`: --hold-out (True),
    --no-hold-out (False), or None: init's rule (`holds_out`) for a complete source; a larger one keeps
    its block, whose rows cost training nothing (they stream in)."""
    texts = _budget_texts(found, found.rows)
    if keep_block is False:
        return "nothing (--no-hold-out): no eval block"
    if keep_block or not found.complete or holds_out(budget, texts, device):
        return None
    return (
        f"nothing: the budget is {passes(budget, texts, device):.1f} passes over the {texts:,} texts, "
        f"at most {OVER_TRAIN_PASSES}, "
        f"where held-out rows cost training more than choosing the best model gives (docs/init.md); "
        f"--hold-out keeps a block out anyway, --heldout SOURCE evaluates on another source"
    )


def _split_data(
    found: Survey,
    heldout: SourceConfig | None,
    out: Path,
    seed: int,
    budget: int | None,
    device: str,
    keep: bool | None,
) -> _Data:
    base = out.parent
    if heldout is not None:
        said = f"nothing of the data: the eval block reads --heldout {heldout.source}"
        return _Data(_as_written(found.config, base), _as_written(heldout, base), found.rows, 0, [], said)
    if nothing := _no_block(found, budget, device, keep):
        return _Data(_as_written(found.config, base), None, found.rows, 0, [], nothing)
    plan = _holdout_for(found, seed)
    train_rows, held_rows = split_rows(found, plan, seed)
    folder = out.parent / f"{out.stem}-data"
    held_path = folder / "heldout.jsonl"
    classes = len(found.class_texts()) if not found.grouped else len(found.rows)
    if found.complete:
        train_path = folder / "train.jsonl"
        write_rows(train_path, train_rows, _with_text_names(found.config))
        write_rows(held_path, held_rows, _with_text_names(found.config))
        said = f"{plan.describe(classes)}; written to {train_path} and {held_path} (files, not a split rule)"
        train = _file_source(found.config, train_path, base)
        return _Data(
            train,
            _file_source(found.config, held_path, base),
            train_rows,
            _texts(found, held_rows),
            [train_path, held_path],
            said,
        )
    write_rows(held_path, held_rows, _with_text_names(found.config))
    said = (
        f"{plan.describe(classes)} from the first {found.rows_read:,} rows, written to {held_path}; WARNING: the "
        f"source is larger than the sample, so training streams all of it, held-out rows included: the held-out "
        f"numbers then measure fit, not generalisation (read it whole with --sample-rows, or pass --heldout)"
    )
    return _Data(
        _as_written(found.config, base),
        _file_source(found.config, held_path, base),
        train_rows,
        _texts(found, held_rows),
        [held_path],
        said,
    )


def _with_text_names(config: SourceConfig) -> SourceConfig:
    return _replace(config, text_column="text", label_column="label") if isinstance(config.source, dict) else config


def _texts(found: Survey, rows: list[list]) -> int:
    """Texts in these rows: one per labelled row, every text of a pair or triplet row."""
    return sum(len(row) for row in rows) if found.grouped else len(rows)


def _budget_texts(found: Survey, rows: list[list]) -> int:
    """The texts a budget's passes are counted over: distinct usable rows per class, every text of a
    pair or triplet row."""
    if found.grouped:
        return len(rows) * len(LAYOUT_OF[found.config.layout].columns(found.config))
    return sum(_class_rows(found, rows))


def _class_rows(found: Survey, rows: list[list]) -> list[int]:
    if found.grouped:
        return [1] * len(rows)
    return [len(texts) for texts in found.class_texts(rows).values()]


def _model_facts(model: str) -> tuple[FolderFacts | None, str]:
    """The folder's facts; for a hub name, those of its JSON files (fetched without the weights)."""
    facts = folder_facts(model)
    if facts is not None or os.path.exists(model):
        return facts, model
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model, allow_patterns=["*.json", "*/*.json"])
    except Exception as error:  # offline, no such repository: sized as a plain pretrained encoder
        return None, f"{model} (its files could not be read: {one_line(error, 120)})"
    found = folder_facts(folder)
    return (FolderFacts(**{**found.__dict__, "has_weights": True}) if found else None), model


def _model_block(model: str, facts: FolderFacts | None, base: Path) -> tuple[list, str, float]:
    """(block, one line for the output, the learning rate)."""
    pretrained = facts is None or facts.has_weights
    local = facts is not None and os.path.exists(model)
    name = _local_path(model, base) if local else model
    pooling = facts.pooling if facts is not None and facts.pooling in POOLINGS else "mean"
    sentence = facts is not None and facts.sentence_transformers
    lr = learning_rate(facts.hidden_size if facts else None, from_scratch=not pretrained)
    hub_id = facts.hub_id if facts is not None else None
    block = [
        ("name", name, "a local folder" if local else "a hub model"),
        ("init", "pretrained" if pretrained else "config", "" if pretrained else "no weights in the folder: random"),
        ("pooling", pooling, "the folder's own Pooling module" if sentence else "mean pooling"),
        (
            "head",
            list(facts.dense) if facts is not None and facts.dense else [],
            "its own Dense layers, training continues from them"
            if facts is not None and facts.dense
            else "no new random layers: they would cost the model's zero-shot quality",
        ),
        ("normalize", True, "unit sphere: the margins below assume it"),
    ]
    if local:
        block.append(("base_model", hub_id or Commented("ORG/NAME"), "the folder's hub id, for the model card"))
    kind = "sentence-transformers folder" if sentence else "encoder"
    hidden = f", hidden size {facts.hidden_size}" if facts is not None and facts.hidden_size else ""
    weights = "pretrained" if pretrained else "random weights (no weights file)"
    return block, f"model: {model}: {kind}, {weights}, {pooling} pooling{hidden}; head [], lr {lr:g}", lr


def _data_block(config: SourceConfig, sizing: Sizing, max_length: int) -> list:
    block: list = [("source", config.source, "")]
    if config.format is not None and not isinstance(config.source, dict):
        block.append(("format", config.format, ""))
    if config.split != "train":
        block.append(("split", config.split, ""))
    if config.load_dataset:
        block.append(("load_dataset", dict(config.load_dataset), "passed to datasets.load_dataset unchanged"))
    block.append(("layout", config.layout, ""))
    for key in LAYOUT_OF[config.layout].column_keys:
        value = getattr(config, key)
        block.append((key, list(value) if isinstance(value, tuple) else value, ""))
    group = "a batch's rows per class, at least" if sizing.regime == "many" else "reused classes: any even batch"
    block += [
        ("samples_per_class", sizing.samples_per_class, group),
        ("shuffle_buffer", sizing.shuffle_buffer, "rows; at most the training rows"),
        ("max_length", max_length, "tokens: 95% of the sampled texts fit"),
        ("tokenizer_workers", sizing.tokenizer_workers, ""),
    ]
    return block


def _train_block(sizing: Sizing, lr: float, device: str, out: Path, seed: int, has_eval: bool) -> list:
    best = "map@r" if has_eval else Commented("map@r")  # past a few passes a small corpus over-trains: docs/init.md
    return [
        ("lr", lr, f"peak rate at the first phase's batch ({sizing.lr_reference_batch})"),
        ("lr_scaling", "sqrt", "each phase: lr × sqrt(batch / lr_reference_batch)"),
        ("lr_reference_batch", sizing.lr_reference_batch, ""),
        ("distance", "squared-euclidean", "FaceNet's; the margins below are in its units"),
        ("device", device, ""),
        ("seed", seed, ""),
        ("output_dir", f"runs/{out.stem}", "relative to the directory train runs in"),
        ("checkpoint_every", sizing.checkpoint_every, "steps (0: at phase ends only); about 10 per run"),
        ("keep_best", best, "the best held-out model of the run, kept under OUTPUT/best"),
    ]


def _eval_block(config: SourceConfig, texts: int, sizing: Sizing) -> list:
    block: list = [("source", config.source, "")]
    for key in ("format", "split", "load_dataset"):
        value = getattr(config, key)
        if value not in (None, "train", {}):
            block.append((key, dict(value) if isinstance(value, dict) else value, ""))
    block.append(("layout", config.layout, ""))
    for key in LAYOUT_OF[config.layout].column_keys:
        value = getattr(config, key)
        block.append((key, list(value) if isinstance(value, tuple) else value, ""))
    rows = max(2, min(HOLD_OUT_MAX_ROWS, texts)) if texts else HOLD_OUT_MAX_ROWS
    block += [
        ("max_rows", rows, "held-out texts read (retrieval costs their square)"),
        ("every", sizing.eval_every, "steps, and at every phase end (0: phase ends only)"),
    ]
    return block


def _words(rows: list[list]) -> list[int]:
    return [len(text.split()) for row in rows[:20_000] for text in row if isinstance(text, str)]


def write_starter(
    config: SourceConfig,
    given: set[str],
    model: str,
    *,
    out: Path,
    budget: int | None,
    device: str | None,
    heldout: SourceConfig | None,
    sample_rows: int | None,
    seed: int,
    force: bool,
    command: str,
    hold_out_block: bool | None = None,
) -> InitResult:
    """Everything `tripletctl init` does: what it wrote and said."""
    if hold_out_block and heldout is not None:
        raise TripletctlError("--hold-out keeps part of --data out and --heldout reads another source: choose one")
    if out.exists() and not force:
        raise TripletctlError(f"{out} already exists: choose another -o/--out, or pass --force to replace it")
    data_dir = out.parent / f"{out.stem}-data"
    if data_dir.exists() and any(data_dir.iterdir()) and not force:
        raise TripletctlError(f"{data_dir} already exists: choose another -o/--out, or pass --force to replace it")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    facts, model_said = _model_facts(model)
    found = survey(config, given, sample_rows or SAMPLE_ROWS)
    with writing(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
    data = _split_data(found, heldout, out, seed, budget, device, hold_out_block)
    try:
        return _finish(found, data, facts, model, model_said, out, budget, device, seed, command)
    except BaseException:
        for path in data.written:
            path.unlink(missing_ok=True)
        if data.written and not any(data_dir.iterdir()):
            data_dir.rmdir()
        raise


def _finish(found, data, facts, model, model_said, out, budget, device, seed, command) -> InitResult:
    class_rows = _class_rows(found, data.train_rows)
    group = len(LAYOUT_OF[found.config.layout].columns(found.config)) if found.grouped else None
    budget = budget or default_budget(_budget_texts(found, data.train_rows), device)
    try:
        sizing = size_run(class_rows, budget, device, group=group, has_eval=data.eval is not None)
    except ValueError as error:
        raise TripletctlError(f"{found.config.source}: {error}") from None
    limits = [n for n in ((facts.max_seq_length, facts.max_positions) if facts else ()) if n]
    max_length = max_length_for(_words(found.rows), min(limits) if limits else None)
    model_block, model_line, lr = _model_block(model, facts, out.parent)
    blocks = {
        "model": model_block,
        "data": _data_block(data.train, sizing, max_length),
        "train": _train_block(sizing, lr, device, out, seed, has_eval=data.eval is not None),
    }
    if data.eval is not None:
        blocks["eval"] = _eval_block(data.eval, data.heldout_texts, sizing)
    lines = _said(found, data, class_rows, model_line.replace(model, model_said, 1), sizing, budget)
    header = [
        f"Written by `{command}` on {time.strftime('%Y-%m-%d')}.",
        *lines,
        "",
        f"`tripletctl validate {out.name}` shows the plan; `tripletctl train {out.name}` runs it. docs/init.md: the rule.",
    ]
    replace_text(out, render(header, blocks, sizing.phases, f"Phases: {sizing.why}."))
    try:
        load_curriculum(out, read_data=FactsReader())
    except ConfigError as error:
        out.unlink(missing_ok=True)
        raise TripletctlError(f"init wrote a curriculum validate refuses (a bug, please report it): {error}") from None
    return InitResult(out, (out, *data.written), tuple(lines))


def _said(found: Survey, data: _Data, class_rows: list[int], model_line: str, sizing: Sizing, budget: int) -> list[str]:
    read = "the whole source" if found.complete else f"the first {found.rows_read:,}: counts are lower bounds"
    if found.grouped:
        shape = f"{len(found.rows):,} usable {found.config.layout} rows, each its own class"
    else:
        sizes = sorted(class_rows)
        shape = f"{len(sizes)} training classes, {sizes[0]:,}-{sizes[-1]:,} distinct rows per class"
    columns = ", ".join(LAYOUT_OF[found.config.layout].columns(found.config))
    phases = ", ".join(f"{p.name} {p.batch_size} × {'≤' if p.until else ''}{p.steps}" for p in sizing.phases)
    return [
        f"data: {found.config.source if not isinstance(found.config.source, dict) else 'the text files'}: "
        f"{found.rows_read:,} rows read ({read}); columns {columns}; {shape}",
        *(f"data: {line}" for line in found.chosen),
        f"held out: {data.said}",
        model_line,
        f"sizing: {sizing.why}",
        f"budget: {budget:,} samples (texts embedded in training batches) → {phases} "
        f"(batch × steps; ≤: `until` may end it sooner), {sizing.samples:,} samples at most",
    ]
