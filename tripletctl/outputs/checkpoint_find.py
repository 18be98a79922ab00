"""Where checkpoints are: the phase directories of a run, and which checkpoint a path means.

`OUTPUT/phase-K-NAME/checkpoint/` (K the 0-based phase index) is trusted only when it holds
`COMPLETE`, written last by checkpoint_save.py. A save killed between its two renames leaves the
previous checkpoint as `checkpoint.prev`: readers take `checkpoint` when it is complete, else
`checkpoint.prev`, else nothing. A run's latest checkpoint is that of its highest-numbered phase
that has one (`--resume`). Nothing here imports torch: the lock, the report and the plots read it.
"""

from __future__ import annotations

import re
from pathlib import Path

from tripletctl.core.errors import CheckpointError
from tripletctl.outputs.run_file import RUN_FILE, run_file

CHECKPOINT = "checkpoint"
COMPLETE = "COMPLETE"
PHASE_DIR_RE = re.compile(r"^phase-(\d+)-(.+)$")


def phase_dir(output_dir: str | Path, index: int, name: str) -> Path:
    """`OUTPUT/phase-K-NAME`, K the 0-based phase index (config/blocks.py `check_phase_name` rejects names with separators)."""
    return Path(output_dir) / f"phase-{index}-{name}"


def checkpoint_dir(output_dir: str | Path, index: int, name: str) -> Path:
    return phase_dir(output_dir, index, name) / CHECKPOINT


def prev_dir(target: Path) -> Path:
    """`checkpoint.prev`: the previous complete copy while a save swaps the new one in."""
    return target.with_name(target.name + ".prev")


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE).is_file()


def usable_dir(target: str | Path) -> Path | None:
    """A directory written by `write_complete_dir` if complete, else its `.prev` if complete (a crash
    mid-swap), else None."""
    target = Path(target)
    for candidate in (target, prev_dir(target)):
        if is_complete(candidate):
            return candidate
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, a phase dir (holding checkpoint/) or a run dir (latest phase) → checkpoint dir."""
    path = Path(path)
    if path.name == CHECKPOINT or is_complete(path) or (path / "state.json").exists():
        found = usable_dir(path)
        if found is None:
            raise CheckpointError(
                f"{path} is not a complete checkpoint (a save was interrupted and no {prev_dir(path).name} survives)"
            )
        return found
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory: expected a checkpoint, phase or run directory")
    if (path / CHECKPOINT).exists() or prev_dir(path / CHECKPOINT).exists():
        found = usable_dir(path / CHECKPOINT)
        if found is None:
            raise CheckpointError(f"phase directory {path} has no complete checkpoint")
        return found
    if run_file(path).exists() or _phase_dirs(path):
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"run directory {path} has no complete checkpoint in any phase")
        return found
    raise CheckpointError(
        f"{path} is not a checkpoint (no {COMPLETE}), a phase directory "
        f"(no {CHECKPOINT}/), a run directory (no {RUN_FILE} or phase-K-NAME/) or a model folder "
        f"(no tripletctl_model.json or modules.json)"
    )


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint of the highest-numbered phase that has one (for --resume)."""
    for _, phase in sorted(_phase_dirs(Path(run_dir)), reverse=True):
        found = usable_dir(phase / CHECKPOINT)
        if found is not None:
            return found
    return None


def _phase_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        match = PHASE_DIR_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return found
