"""Atomic checkpoint directories: a crash at any moment leaves a loadable checkpoint behind.

Layout of one checkpoint (`OUTPUT/phase-K-NAME/checkpoint/`, K the 0-based phase index):

    model/            save_model output: tripletctl, transformers and sentence-transformers load it
    optimizer.pt      optimizer.state_dict()
    state.json        the caller's `state` keys (phase, step, counters...) + "format_version",
                      "stream" (JSON-able stream state) and "stream_file" (else "stream.pt")
    stream.pt         data-stream state, only when it does not survive a JSON round trip
                      (plain containers and tensors only: it loads with weights_only=True)
    rng.pt            python / numpy / torch CPU / torch CUDA RNG states (a list of them, one per rank, under torchrun)
    memory.pt         the cross-batch memory queue (tensors only), in a phase with `memory`
    centroids.pt      class centroids and their snapshots (tensors only), with `batch_classes: neighbours`
    mined.pt          the open phase's mined-negatives table (token ids, tensors only), with `mined_negatives`
    curriculum.yaml   the curriculum as run
    COMPLETE          written last: a directory without it is never trusted

Saving writes `checkpoint.tmp-<pid>`, then `checkpoint` → `checkpoint.prev`, tmp → `checkpoint`,
and removes `checkpoint.prev`; which one a reader takes is checkpoint_find.py's, how it is read
checkpoint_load.py's. A directory is deleted only after a rename to `checkpoint.trash-*`, so a kill
half-way through a deletion never leaves a half-deleted directory under a name readers trust. A
write the environment refuses (disk full, read-only) raises `OutputError` naming the file, and
leaves the previous checkpoint as it was. Nothing is written that a safe reader could not load back.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from tripletctl.config.blocks import plain
from tripletctl.core.errors import OutputError, writing
from tripletctl.core.faults import fault_point
from tripletctl.core.files import orphaned
from tripletctl.model.card import Provenance
from tripletctl.model.encoder import save_model
from tripletctl.outputs.checkpoint_find import COMPLETE, is_complete, prev_dir, usable_dir
from tripletctl.outputs.rng import capture_rng

CHECKPOINT_FORMAT_VERSION = 1
RESERVED_STATE_KEYS = ("format_version", "stream", "stream_file")  # state.json keys we own
POSITION_KEYS = ("phase_index", "phase_name", "step", "global_step")  # state keys the model card quotes


def save_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None,
    state: dict,
    stream_state: dict | None,
    curriculum: dict,
    rng: list[dict] | None = None,
    memory: dict | None = None,
    metrics: dict | None = None,
    centroids: dict | None = None,
    mined: dict | None = None,
) -> Path:
    """Write a complete checkpoint at `directory` atomically and return its path.

    `state` must be JSON-serialisable (phase index/name, step, global step, counters, world size);
    its keys land at the top level of state.json, beside the reserved "format_version", "stream"
    and "stream_file".
    RNG states are captured here, so call this at the point the run would continue from; under
    torchrun pass `rng`, every rank's `capture_rng()` in rank order, so each rank resumes its own.
    `memory` (a dict of tensors) is the cross-batch memory queue, saved as memory.pt; `centroids`
    (a dict of tensors) the class centroids of neighbour batches, saved as centroids.pt; `mined` the
    open phase's mined-negatives table, saved as mined.pt.
    `metrics`: the held-out eval of these exact weights, if one was just measured (model card).
    """
    clash = [k for k in RESERVED_STATE_KEYS if k in state]
    if clash:
        raise ValueError(f"state keys {clash} are reserved by the checkpoint format")
    target = Path(directory)
    provenance = Provenance(
        curriculum=plain(curriculum), metrics=metrics, position={k: state[k] for k in POSITION_KEYS if k in state}
    )
    fill = partial(
        _write_contents,
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        state=state,
        stream_state=stream_state,
        curriculum=curriculum,
        rng=rng,
        memory=memory,
        centroids=centroids,
        mined=mined,
        provenance=provenance,
    )
    try:
        return write_complete_dir(target, fill)
    except OutputError as error:  # disk full, read-only: the old checkpoint stays in place
        kept = usable_dir(target)
        if kept is not None:
            raise OutputError(f"{error}; the last good checkpoint {kept} is kept") from error
        raise


def write_complete_dir(directory: str | Path, fill: Callable[[Path], None]) -> Path:
    """Fill a fresh temporary directory, mark it COMPLETE and swap it in for `directory` (as
    checkpoints are: the old one stays readable until the new one is in place, and a failure while
    filling leaves it untouched). `best.py` keeps OUTPUT/best this way."""
    target = Path(directory)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        with writing(target.parent):
            target.parent.mkdir(parents=True, exist_ok=True)
            clean_leftovers(target)
            tmp.mkdir()
        with writing(tmp):
            fill(tmp)
            _fsync_tree(tmp)
            _write_synced(tmp / COMPLETE, "ok\n")  # last: its presence vouches for everything above
            _fsync_dir(tmp)
        with writing(target):
            _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_contents(
    tmp: Path,
    *,
    model,
    tokenizer,
    optimizer,
    state,
    stream_state,
    curriculum,
    rng,
    memory,
    provenance: Provenance,
    centroids=None,
    mined=None,
) -> None:
    record: dict[str, Any] = {**state, "format_version": CHECKPOINT_FORMAT_VERSION, "stream": None, "stream_file": None}
    if stream_state is not None and _json_roundtrips(stream_state):
        record["stream"] = stream_state
    elif stream_state is not None:  # tensors, tuples, int keys...: keep them exact
        buffer = io.BytesIO()
        torch.save(stream_state, buffer)
        try:  # refuse to write what a safe reader could not load back
            torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise TypeError(f"stream state holds objects that cannot load without running code: {e}") from None
        _torch_save(stream_state, tmp / "stream.pt")
        record["stream_file"] = "stream.pt"
    with writing(tmp / "state.json"):
        (tmp / "state.json").write_text(json.dumps(record, indent=2) + "\n")
    with writing(tmp / "model"):
        save_model(model, tokenizer, tmp / "model", provenance)
    fault_point("checkpoint-write")
    if optimizer is not None:
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
    _torch_save(rng if rng is not None else capture_rng(), tmp / "rng.pt")
    if memory is not None:
        _torch_save(memory, tmp / "memory.pt")
    if centroids is not None:
        _torch_save(centroids, tmp / "centroids.pt")
    if mined is not None:
        _torch_save(mined, tmp / "mined.pt")
    with writing(tmp / "curriculum.yaml"):
        (tmp / "curriculum.yaml").write_text(yaml.safe_dump(plain(curriculum), sort_keys=False))


class _RecordingFile:
    """A file for torch.save that keeps the OSError of a failed write: torch.save replaces it with
    an opaque RuntimeError ("unexpected pos ..."), and the user needs to read "No space left"."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.error = handle, None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def _torch_save(obj: Any, path: Path) -> None:
    with writing(path):
        with open(path, "wb") as handle:
            recording = _RecordingFile(handle)
            try:
                torch.save(obj, recording)
            except RuntimeError as error:
                if recording.error is not None:
                    raise recording.error from error
                raise


def _swap_in(tmp: Path, target: Path) -> None:
    """tmp → target, keeping a complete copy on disk under a trusted name at every instant."""
    prev = prev_dir(target)
    if target.exists():
        if is_complete(target):
            if prev.exists():  # leftover of an interrupted save; target supersedes it
                _discard(prev)
            os.replace(target, prev)
        else:  # never rotate junk over a good .prev
            _discard(target)
    fault_point("checkpoint-swap")
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if prev.exists():
        _discard(prev)


def _discard(directory: Path) -> None:
    """Delete a directory crash-safely: rename it to `NAME.trash-*` (atomic) first, then remove it.
    A kill during the removal leaves only a trash directory, which nothing reads and the next save
    or start-up removes."""
    base = directory.name.split(".")[0]
    trash = directory.with_name(f"{base}.trash-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(directory, trash)
    _fsync_dir(directory.parent)
    fault_point("checkpoint-cleanup")
    shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(target: Path) -> None:
    """Remove what killed saves left beside `target` (a `checkpoint` path): `checkpoint.tmp-PID` and
    `checkpoint.trash-PID-*` directories of processes that are gone (never read; a live process's
    are its own business), and `checkpoint.prev` once `checkpoint` is complete (never read either)."""
    for pattern in (f"{target.name}.tmp-*", f"{target.name}.trash-*"):
        for stale in target.parent.glob(pattern):
            if orphaned(stale):
                shutil.rmtree(stale, ignore_errors=True)
    prev = prev_dir(target)
    if prev.exists() and is_complete(target):
        _discard(prev)


def _json_roundtrips(value: Any) -> bool:
    try:
        return json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError):
        return False


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    """Make renames/creations inside `path` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
