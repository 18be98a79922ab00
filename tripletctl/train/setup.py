"""Start-up and resume: everything `train` checks and builds before the first step.

The output directory, whether `--resume` (or its absence) fits it, whether a checkpoint's
configuration may continue under the curriculum given, the seeded model and optimiser, and what the
checkpoint holds (weights, optimiser, stream position, RNG, memory), each damaged file one line.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from tripletctl.config.blocks import Curriculum, MemoryConfig, curriculum_to_dict, plain
from tripletctl.core.errors import CheckpointError, ConfigError, TripletctlError, writing
from tripletctl.core.files import orphaned
from tripletctl.core.jsonio import replace_text
from tripletctl.model.compiled import CompiledOrEager, compile_wanted
from tripletctl.model.encoder import build_model
from tripletctl.outputs.checkpoint_find import CHECKPOINT, latest_checkpoint
from tripletctl.outputs.checkpoint_load import load_checkpoint
from tripletctl.outputs.checkpoint_save import clean_leftovers
from tripletctl.train.class_centroids import ClassCentroids
from tripletctl.train.distributed import DistContext, check_world_size
from tripletctl.train.memory import EmbeddingMemory
from tripletctl.train.mined_negatives import MinedTable
from tripletctl.train.state import RunProgress


def _clean_stale_files(output: Path) -> None:
    """Start-up: remove what killed runs left behind (`*.tmp-PID` files, checkpoint tmp/trash
    directories, a superseded `checkpoint.prev`); none of it is ever read. Only a dead process's
    temporaries go (core/files.py `orphaned`): never a file another live process is writing."""
    for directory in (output, *(d for d in output.glob("phase-*") if d.is_dir())):
        for stale in directory.glob("*.tmp-*"):
            if stale.is_file() and orphaned(stale):
                stale.unlink(missing_ok=True)
        if directory != output:
            clean_leftovers(directory / CHECKPOINT)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# What a half-done phase must keep on --resume: changing any of them would train one phase under two
# configurations (and report the new one for all of it). chunk_size, lr, steps... may change.
RESUME_PHASE_KEYS = (
    "batch_size",
    "mining",
    "margin",
    "distance",
    "loss",
    "batch_classes",
    "neighbour_share",
    "neighbour_group",
)
RESUME_DATA_KEYS = ("samples_per_class", "neighbour_refresh")  # refresh: which centroid snapshot a batch uses


_MISSING = object()  # a key the checkpoint's curriculum does not have (an older tripletctl): not compared


def _memory_changes(saved_phase: dict, memory: MemoryConfig | None) -> list[tuple[str, Any, Any]]:
    """(key, saved, now) of the phase's cross-batch memory: on/off as `memory`, else each of its keys
    (a queue of 128 rows must not become 32 inside one phase). A checkpoint without the key says nothing."""
    old, new = saved_phase.get("memory", _MISSING), plain(memory)
    if old is _MISSING:
        return []
    if not isinstance(old, dict) or new is None:
        return [("memory", old, new)]
    return [(f"memory.{key}", old.get(key, _MISSING), value) for key, value in new.items()]


def check_resume_compatible(curriculum: Curriculum, saved: dict, state: dict, progress: RunProgress) -> None:
    """Refuse a resume that would split, lose or silently re-configure a phase that has started.

    `saved` is the curriculum the checkpoint was written under, `state` its state.json."""
    saved_phases = saved.get("phases") if isinstance(saved.get("phases"), list) else []
    index, restart = progress.phase_index, "or start a new run with train.output_dir=..."

    def saved_phase(i: int) -> dict:
        return saved_phases[i] if i < len(saved_phases) and isinstance(saved_phases[i], dict) else {}

    stopped_in = state.get("phase_name") or saved_phase(index).get("name") or f"phase {index}"
    stopped_in = stopped_in if isinstance(stopped_in, str) and len(stopped_in) <= 80 else f"phase {index}"
    for i in range(index + 1):  # every phase that has started keeps its place and its name
        old = stopped_in if i == index else saved_phase(i).get("name")
        if not isinstance(old, str) or len(old) > 80:
            continue
        if i >= len(curriculum.phases):
            raise ConfigError(
                [
                    f"--resume: the run stopped in phases[{index}] ({stopped_in}), but {curriculum.path} "
                    f"now has {len(curriculum.phases)} phases: phases[{i}] ({old}) was removed; "
                    f"put it back, {restart}"
                ]
            )
        if curriculum.phases[i].name != old:
            raise ConfigError(
                [
                    f"--resume: phases[{i}] was '{old}' when the run was checkpointed and is "
                    f"'{curriculum.phases[i].name}' in {curriculum.path}: renaming, removing or "
                    f"reordering a phase that has started would split it over two directories; "
                    f"restore it, {restart}"
                ]
            )
    phase = curriculum.phases[index]
    if not 0 < progress.step < phase.steps or progress.phase_finished(phase):
        return  # the next phase starts from scratch: any configuration is fine
    where = f"--resume: phases[{index}] ({phase.name}) is half done (step {progress.step} of {phase.steps})"
    problems = []
    changes = [(key, saved_phase(index).get(key, _MISSING), getattr(phase, key)) for key in RESUME_PHASE_KEYS]
    saved_data = saved.get("data") if isinstance(saved.get("data"), dict) else {}
    changes += [
        (f"data.{key}", saved_data.get(key, _MISSING), getattr(curriculum.data, key)) for key in RESUME_DATA_KEYS
    ]
    changes += _memory_changes(saved_phase(index), phase.memory)
    # the table in mined.pt was mined under these settings, and per_class sizes every batch
    changes.append(
        ("mined_negatives", saved_phase(index).get("mined_negatives", _MISSING), plain(phase.mined_negatives))
    )
    for key, old, new in changes:
        if old is not _MISSING and old != new:
            old = repr(old) if len(repr(old)) <= 80 else repr(old)[:77] + "..."  # a file may hold anything
            problems.append(
                f"{where}: its {key} was {old} and is now {new!r}; resuming would mix two "
                f"configurations in one phase. Restore {key}, {restart}"
            )
    if problems:
        raise ConfigError(problems)


def check_before_start(curriculum: Curriculum, resume: bool) -> Path | None:
    """The latest checkpoint, if any, once `--resume` (or its absence) fits the output directory and
    the checkpoint's own files (cheap, and every damaged one is one clear line) fit the curriculum."""
    output = Path(curriculum.train.output_dir)
    previous = latest_checkpoint(output)
    if previous is not None and not resume:
        raise TripletctlError(
            f"{output} already holds a run (latest checkpoint {previous}); "
            "pass --resume to continue it, or set train.output_dir=... to start a new one"
        )
    if resume and previous is None:
        raise TripletctlError(f"--resume: no checkpoint found under {output}")
    if resume:
        saved = load_checkpoint(previous)
        check_resume_compatible(
            curriculum, saved.curriculum, saved.state, RunProgress.from_state(saved.state, saved.path)
        )
    return previous


def prepare_output(curriculum: Curriculum) -> None:
    """Create the output directory, remove what killed runs left, and save the curriculum as run."""
    output = Path(curriculum.train.output_dir)
    with writing(output):
        output.mkdir(parents=True, exist_ok=True)
        _clean_stale_files(output)
    replace_text(output / "curriculum.yaml", yaml.safe_dump(curriculum_to_dict(curriculum), sort_keys=False))


def build_run_model(curriculum: Curriculum, ctx: DistContext) -> tuple[torch.nn.Module, Any, torch.optim.Optimizer]:
    """The seeded model on its device (compiled with train.compile), its tokenizer and the optimiser."""
    train_cfg = curriculum.train
    _seed_everything(train_cfg.seed + ctx.rank)  # ranks draw different dropout masks (weights are seeded apart)
    model, tokenizer = build_model(curriculum.model, seed=train_cfg.seed)
    positions = getattr(model.encoder.config, "max_position_embeddings", None)
    if positions and curriculum.data.max_length > positions:  # would crash in the first forward
        raise TripletctlError(
            f"{curriculum.path}: data.max_length must be at most the model's "
            f"max_position_embeddings ({positions}), got {curriculum.data.max_length}"
        )
    model.to(ctx.device)
    if compile_wanted(train_cfg.compile, ctx.device):  # falls back to eager, with one line, if compiling fails
        model.encoder = CompiledOrEager(model.encoder, warn=lambda line: print(line, file=sys.stderr, flush=True))
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=curriculum.phases[0].lr,
        weight_decay=train_cfg.weight_decay,
        fused=train_cfg.fused_adamw and ctx.device.type == "cuda",  # one kernel instead of a few per tensor
    )
    return model, tokenizer, optimizer


@dataclass
class Resumed:
    """Where this invocation starts: from scratch, or what the checkpoint held, checked."""

    progress: RunProgress = field(default_factory=RunProgress)
    stream_state: dict | None = None
    memory: EmbeddingMemory | None = None
    centroids: ClassCentroids | None = None  # batch_classes: neighbours (centroids.pt)
    mined: MinedTable | None = None  # the open phase's mined_negatives table (mined.pt)
    rng: Any = None  # this rank's RNG state, restored last
    closed_phase: int | None = None  # the checkpoint ended this phase (its summary may be missing)


def load_resume(
    curriculum: Curriculum,
    previous: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: DistContext,
    console: Console,
) -> Resumed:
    """Load the weights and optimiser state into `model` and `optimizer`; the rest, checked, returned."""
    loaded = load_checkpoint(previous, model=model, optimizer=optimizer, map_location=ctx.device)
    world_size = loaded.state.get("world_size", 1)
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise CheckpointError(f"{loaded.path / 'state.json'} is damaged: world_size is {world_size!r}")
    check_world_size(world_size, ctx)
    resumed = Resumed(RunProgress.from_state(loaded.state, loaded.path), loaded.stream_state, rng=loaded.rng)
    if loaded.memory is not None:
        try:
            resumed.memory = EmbeddingMemory.from_state_dict(loaded.memory, device=ctx.device)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {loaded.path} is damaged: memory.pt: {e}") from None
    if loaded.centroids is not None:
        try:
            resumed.centroids = ClassCentroids.from_state_dict(loaded.centroids, device=ctx.device)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {loaded.path} is damaged: centroids.pt: {e}") from None
    if loaded.mined is not None:
        try:
            resumed.mined = MinedTable.from_state_dict(loaded.mined)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {loaded.path} is damaged: mined.pt: {e}") from None
    if isinstance(resumed.rng, list):  # one state per rank (check_world_size made the counts equal)
        if len(resumed.rng) != ctx.world_size:
            raise CheckpointError(
                f"{loaded.path / 'rng.pt'} holds {len(resumed.rng)} ranks' states, the run has {ctx.world_size}"
            )
        resumed.rng = resumed.rng[ctx.rank]
    progress = resumed.progress
    if progress.phase_finished(curriculum.phases[progress.phase_index]):  # closed its phase: start the next one
        resumed.closed_phase = progress.phase_index
        progress.start_phase(progress.phase_index + 1)
    if ctx.is_main and progress.phase_index >= len(curriculum.phases):
        console.print(f"nothing to resume: every phase of {curriculum.path} is done ({previous})")
    elif ctx.is_main:
        console.print(
            f"resuming from {previous} at phase {progress.phase_index}, step {progress.step} "
            f"(global step {progress.global_step})"
        )
    return resumed
