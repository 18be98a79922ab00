"""The phases list of a curriculum checked: each phase's keys, its chunking, the keys it takes from the
train block, the loss, mining, guard and memory together (config/loss_rules.py's table), its `until:`
block, batch sizes of whole classes or triplet groups, and duplicate names. Every problem names the
phase (`phases[2] (hard)`) and goes into one `Problems`."""

from __future__ import annotations

from typing import Any

from tripletctl.config import schema
from tripletctl.config.block_checks import check_keys
from tripletctl.config.blocks import (
    PHASE_KEYS,
    PHASE_KEYS_FROM_TRAIN,
    PLATEAU_KEYS,
    UNTIL_KEYS,
    PhaseConfig,
    chunking_conflict,
)
from tripletctl.config.layouts import LAYOUT_OF
from tripletctl.config.loss_rules import DEFAULT_LOSS, refusals
from tripletctl.config.problems import Override, Problems, origin_of, phase_label, show_value
from tripletctl.config.until import CONDITIONS, Plateau, UntilConfig, default_min_steps

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
        hardness=bool(values.get("hardness_alpha")),
    )
    for message, keys in found:
        problems.add(f"{label}: {message}", origin(*keys))


def _check_until(
    raw: dict, steps: int | None, eval_every: int | None, label: str, index: int, origins: dict, problems: Problems
) -> UntilConfig | None:
    """A phase's `until:` block; every problem is reported, each on its own line."""
    before = len(problems.messages)
    key_path = ("phases", index, "until")
    values = check_keys(
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
            checked = check_keys(
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


def check_phases(
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
        values = _check_phase(raw_phase, index, train, group, eval_every, origins, problems)
        if values is None:
            continue
        name = values.get("name")
        if name in first_index_of:
            problems.add(
                f"{phase_label(index, raw_phase)}: duplicate phase name '{name}' (also phases[{first_index_of[name]}])",
                origin_of(origins, ("phases", index, "name")),
            )
        elif name is not None:
            first_index_of[name] = index
        phases.append(values)
    return phases


def _check_phase(
    raw_phase: Any,
    index: int,
    train: dict,
    group: tuple[int, str] | None,
    eval_every: int | None,
    origins: dict,
    problems: Problems,
) -> dict | None:
    """One phase's keys, its chunking, the keys it takes from the train block, its loss, `until:` and
    batch size; None when it is not a mapping."""
    label = phase_label(index, raw_phase)
    if not isinstance(raw_phase, dict):
        problems.add(
            f"{label}: must be a mapping with name, mining, batch_size and steps, got {show_value(raw_phase)}",
            origin_of(origins, ("phases", index)),
        )
        return None
    values = check_keys(
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
    mined = values.get("mined_negatives")
    if mined is not None and group is not None:  # each class brings its mined rows too (they count in batch_size)
        group = (group[0] + mined.per_class, f"{group[1]} + mined_negatives.per_class")
    _check_batch_fits_groups(values.get("batch_size"), group, label, index, origins, problems)
    return values


def _check_batch_fits_groups(
    batch_size: Any, group: tuple[int, str] | None, label: str, index: int, origins: dict, problems: Problems
) -> None:
    """A batch is whole groups (a class's samples_per_class rows, or a triplet group), at least two."""
    if batch_size is None or group is None:
        return
    rows, what = group
    batch_origin = origin_of(origins, ("phases", index, "batch_size"))
    if batch_size % rows:
        problems.add(f"{label}: batch_size must be a multiple of {what} ({rows}), got {batch_size}", batch_origin)
    elif batch_size // rows < 2:
        problems.add(
            f"{label}: batch_size must hold at least 2 classes of {what} ({rows}) rows, "
            f"i.e. be at least {2 * rows}, got {batch_size}",
            batch_origin,
        )


def check_neighbour_phases(
    phases: list[dict] | None, data: dict, invalid_data: set[str], origins: dict, problems: Problems
) -> None:
    """`batch_classes: neighbours` and `mined_negatives` need classes with several rows (not pairs/triplets, where every row
    is its own class) and a group that fits the classes of one batch (batch_size / samples_per_class)."""
    layout = LAYOUT_OF[data["layout"]]
    spc = None if "samples_per_class" in invalid_data else data["samples_per_class"]
    for index, values in enumerate(phases or []):
        if values.get("mined_negatives") is not None and layout.grouped:
            problems.add(
                f"{phase_label(index, values)}: mined_negatives needs classes of several rows; data.layout "
                f"{layout.name} makes every row its own class (give negatives in the rows: layout triplets)",
                origin_of(origins, ("phases", index, "mined_negatives")),
            )
        if values.get("batch_classes") != "neighbours":
            continue
        label, where = phase_label(index, values), ("phases", index, "batch_classes")
        if layout.grouped:
            problems.add(
                f"{label}: batch_classes neighbours needs classes of several rows; data.layout {layout.name} "
                f"makes every row its own class: use batch_classes random",
                origin_of(origins, where),
            )
            continue
        batch, group = values.get("batch_size"), values.get("neighbour_group", 4)
        if isinstance(batch, int) and spc is not None and group > batch // spc:
            problems.add(
                f"{label}: neighbour_group {group} must fit the {batch // spc} classes of a batch "
                f"(batch_size {batch} / data.samples_per_class {spc}); lower neighbour_group",
                origin_of(origins, ("phases", index, "neighbour_group")) or origin_of(origins, where),
            )
