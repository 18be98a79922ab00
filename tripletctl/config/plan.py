"""What tripletctl shows of a curriculum before any work: the plan table `validate` prints.

Its own module, apart from validate.py, so that loading and checking a curriculum stays plain data
(no rich), and apart from train/progress_bar.py, which is the live display of a running phase that the
training loop imports: the plan is a static description of what will run, needed by `validate` without any of
the loop. Both print through rich, the project's one display library.
"""

from __future__ import annotations

from collections.abc import Callable

from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tripletctl.config.blocks import Curriculum, DataConfig, PhaseConfig, describe_source
from tripletctl.config.layouts import LAYOUT_OF
from tripletctl.config.loss_rules import DEFAULT_LOSS, LOSS_RULES
from tripletctl.config.lr_scaling import EXPONENT, phase_peak_lr, reference_batch
from tripletctl.config.mined_negatives import stream_rows
from tripletctl.config.sizing import DataFacts, batch_fill
from tripletctl.config.until import describe as describe_until


def _describe_chunks(phase: PhaseConfig) -> str:
    if isinstance(phase.chunk_size, int) and phase.chunk_tokens is None:
        return f"{phase.chunk_size} rows each"
    if isinstance(phase.chunk_tokens, int):
        return f"length-sorted, {phase.chunk_tokens:,} tokens each"
    return "length-sorted, auto token budget"


def _describe_layout(data: DataConfig) -> str:
    """What one group of a batch is, so the `groups` column reads right."""
    layout = LAYOUT_OF[data.layout]
    if layout.given_negatives:
        n = len(data.negative_columns)
        return (
            f"triplets: a group is one row's anchor, positive and {n} negative{'s' if n > 1 else ''}, "
            f"{data.rows_per_group} texts"
        )
    if layout.grouped:
        return f"{layout.name}: a group is one row's anchor and positive, 2 texts"
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
    groups = LAYOUT_OF[c.data.layout].grouped
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
    extra = _optional_columns(c)
    for header in extra:
        table.add_column(header, justify="right" if header == "memory" else "left", overflow="fold")
    for index, phase in enumerate(c.phases):
        at_most = "≤" if phase.until else ""  # conditions may end the phase earlier
        table.add_row(
            str(index),
            escape(phase.name),
            phase.mining,
            f"{phase.batch_size:,}",
            *([f"{phase.batch_size // c.data.rows_per_group:,}"] if groups else []),
            f"{phase.margin:g}",
            f"{at_most}{phase.steps:,}",
            f"{at_most}{phase.batch_size * phase.steps:,}",
            f"{phase_peak_lr(c, index):.3g}" if c.train.lr_scaling != "none" else f"{phase.lr:g}",
            phase.distance,
            *(describe(phase) for describe in extra.values()),
        )
    # caption lines are not wrapped at the table's width: a long path stays one line (print with
    # crop=False so a terminal narrower than a line wraps it itself rather than rich cutting it)
    table.caption = Text("\n".join(_caption_lines(c)), no_wrap=True, overflow="ignore")
    return table


def _loss_cell(phase: PhaseConfig) -> str:
    """The loss, with its temperature (and hardness α when set) for the losses that read them."""
    if not LOSS_RULES[phase.loss].temperature:
        return phase.loss
    alpha = f" α={phase.hardness_alpha:g}" if phase.hardness_alpha else ""
    return f"{phase.loss} τ={phase.temperature:g}{alpha}"


def _optional_columns(c: Curriculum) -> dict[str, Callable[[PhaseConfig], str]]:
    """Columns shown only when some phase uses them, so plans without them print as they always did."""
    columns: dict[str, Callable[[PhaseConfig], str]] = {}
    if any(p.loss != DEFAULT_LOSS for p in c.phases):
        columns["loss"] = _loss_cell
    if any(p.false_negative_guard is not None for p in c.phases):
        columns["guard"] = lambda p: "-" if p.false_negative_guard is None else f"ρ={p.false_negative_guard:g}"
    if any(p.batch_classes != "random" for p in c.phases):
        columns["classes"] = lambda p: (
            "random" if p.batch_classes == "random" else f"{p.neighbour_share:g} in groups of {p.neighbour_group}"
        )
    if any(p.memory is not None for p in c.phases):
        columns["memory"] = lambda p: (
            "-" if p.memory is None else f"{p.memory.size:,} from step {p.memory.start_step:,}"
        )
    return columns


def _caption_lines(c: Curriculum) -> list[str]:
    """Below the table: early ends, the model, the data, the eval, chunks, best model, non-finite
    handling, the output directory and the totals."""
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
    if c.train.lr_scaling != "none":
        lines.append(
            f"lr scaling: {c.train.lr_scaling}, the lr column is lr × (batch / {reference_batch(c):,})"
            f"^{EXPONENT[c.train.lr_scaling]:g}"
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
    return lines + [
        f"output: {c.train.output_dir}"
        + (f" (reported to {', '.join(c.train.report_to)})" if c.train.report_to else ""),
        f"total: {'at most ' if any(p.until for p in c.phases) else ''}{total_steps:,} steps, "
        f"{total_samples:,} samples",
    ]


def data_lines(c: Curriculum, facts: dict[str, DataFacts | None]) -> list[str]:
    """Under the plan: what `validate` read of each source (data/header.py), the classes too small to
    ever fill a batch slot, and the phases whose batches reuse every class because the data has fewer
    than the batch has slots."""
    lines = []
    for block, found in facts.items():
        if found is None:
            lines.append(f"{block}: not read here (a hub dataset or remote files): train checks its columns first")
        elif found.note:
            lines.append(f"{block}: {found.note}")
        else:
            read = (
                f"all {found.rows_read:,} rows read" if found.complete else f"the first {found.rows_read:,} rows read"
            )
            classes = ""
            if found.class_rows:
                sizes = found.class_rows
                more = "" if found.complete else " or more"
                classes = f", {len(sizes):,}{more} classes of {min(sizes):,}-{max(sizes):,} distinct rows"
            lines.append(f"{block}: {read}, {found.usable_rows:,} usable{classes}; columns {', '.join(found.columns)}")
    found = facts.get("data")
    if found is None or not found.class_rows or LAYOUT_OF[c.data.layout].grouped:
        return lines
    spc = c.data.samples_per_class
    unused = [n for n in found.class_rows if n < spc]
    if unused and found.complete:  # exact counts only; such a class never fills: never an anchor, at most mined
        lines.append(
            f"data: {len(unused):,} of {len(found.class_rows):,} classes ({sum(unused):,} of {sum(found.class_rows):,}"
            f" rows) hold fewer than samples_per_class ({spc}) distinct rows: no batch takes them"
            + (f"; data.samples_per_class=2 would take {sum(1 for n in unused if n >= 2):,} of them" if spc > 2 else "")
        )
    for index, phase in enumerate(c.phases):
        drawn = stream_rows(phase.batch_size, spc, phase.mined_negatives)  # the rest are mined
        kind, why = batch_fill(found.class_rows, drawn, spc)
        if kind == "reuse":
            lines.append(f"batch: phase {index} ({phase.name}) batch {phase.batch_size:,} has {why}")
    return lines
