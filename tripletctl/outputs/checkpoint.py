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
    curriculum.yaml   the curriculum as run
    COMPLETE          written last: a directory without it is never trusted

Saving writes `checkpoint.tmp-<pid>`, then `checkpoint` → `checkpoint.prev`, tmp → `checkpoint`,
and removes `checkpoint.prev`. Readers take `checkpoint` when it is complete, else `checkpoint.prev`.
A directory is deleted only after a rename to `checkpoint.trash-*`, so a kill half-way through a
deletion never leaves a half-deleted directory under a name readers trust. A write the environment
refuses (disk full, read-only) raises `OutputError` naming the file, and leaves the previous
checkpoint as it was.

A checkpoint is untrusted input (it may come from anywhere): loading runs no code from it. Tensors
load with `torch.load(weights_only=True)`, weights from safetensors, the rest is JSON/YAML; every file
read must lie inside the checkpoint directory (no absolute `stream_file`, no `..`, no symlink out).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import random
import re
import shutil
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from tripletctl.config.blocks import plain
from tripletctl.config.yaml_io import read_yaml_file, safe_yaml_load
from tripletctl.core.errors import CheckpointError, ModelError, OutputError, one_line, writing
from tripletctl.core.faults import fault_point
from tripletctl.core.files import FileRefused, check_regular, orphaned
from tripletctl.core.jsonio import read_json
from tripletctl.model.card import Provenance
from tripletctl.model.encoder import load_model, save_model, unwrap
from tripletctl.outputs.run_file import RUN_FILE, run_file

CHECKPOINT = "checkpoint"
COMPLETE = "COMPLETE"
CHECKPOINT_FORMAT_VERSION = 1
RESERVED_STATE_KEYS = ("format_version", "stream", "stream_file")  # state.json keys we own
POSITION_KEYS = ("phase_index", "phase_name", "step", "global_step")  # state keys the model card quotes
PHASE_DIR_RE = re.compile(r"^phase-(\d+)-(.+)$")


@dataclass
class LoadedCheckpoint:
    path: Path  # the checkpoint directory actually read (may be checkpoint.prev)
    state: dict  # the `state` dict given to save_checkpoint
    stream_state: dict | None
    curriculum: dict
    rng: dict | list[dict]  # pass to restore_rng when ready; a list holds one state per rank (torchrun)
    memory: dict | None = None  # EmbeddingMemory.state_dict() when the phase had a memory

    @property
    def model_dir(self) -> Path:
        return self.path / "model"


# ---------------------------------------------------------------------------------------- layout


def phase_dir(output_dir: str | Path, index: int, name: str) -> Path:
    """`OUTPUT/phase-K-NAME`, K the 0-based phase index (config/blocks.py `check_phase_name` rejects names with separators)."""
    return Path(output_dir) / f"phase-{index}-{name}"


def checkpoint_dir(output_dir: str | Path, index: int, name: str) -> Path:
    return phase_dir(output_dir, index, name) / CHECKPOINT


def _prev(target: Path) -> Path:
    return target.with_name(target.name + ".prev")


def _is_complete(directory: Path) -> bool:
    return (directory / COMPLETE).is_file()


# ------------------------------------------------------------------------------------------- rng


def capture_rng() -> dict:
    """Every RNG a training step may draw from, as plain Python / tensors (weights_only-loadable)."""
    rng: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if "numpy" in sys.modules:  # only if something in the process uses numpy
        name, keys, pos, has_gauss, cached = sys.modules["numpy"].random.get_state()
        rng["numpy"] = (name, keys.tolist(), int(pos), int(has_gauss), float(cached))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    """Inverse of `capture_rng`; states for RNGs absent in this process are ignored."""
    random.setstate(_to_tuple(rng["python"]))
    torch.set_rng_state(rng["torch"])
    if "numpy" in rng:
        import numpy as np

        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in rng and torch.cuda.is_available():
        states = rng["cuda"][: torch.cuda.device_count()]
        for device, state in enumerate(states):
            torch.cuda.set_rng_state(state, device)


def _to_tuple(value: Any) -> Any:
    """random.setstate wants nested tuples; a serializer may hand back lists."""
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ------------------------------------------------------------------------------------------ save


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
) -> Path:
    """Write a complete checkpoint at `directory` atomically and return its path.

    `state` must be JSON-serialisable (phase index/name, step, global step, counters, world size);
    its keys land at the top level of state.json, beside the reserved "format_version", "stream"
    and "stream_file".
    RNG states are captured here, so call this at the point the run would continue from; under
    torchrun pass `rng`, every rank's `capture_rng()` in rank order, so each rank resumes its own.
    `memory` (a dict of tensors) is the cross-batch memory queue, saved as memory.pt.
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
        provenance=provenance,
    )
    try:
        return write_complete_dir(target, fill)
    except OutputError as error:  # disk full, read-only: the old checkpoint stays in place
        kept = _usable(target)
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
    tmp: Path, *, model, tokenizer, optimizer, state, stream_state, curriculum, rng, memory, provenance: Provenance
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
    prev = _prev(target)
    if target.exists():
        if _is_complete(target):
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
    prev = _prev(target)
    if prev.exists() and _is_complete(target):
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


# ------------------------------------------------------------------------------------------ load


def load_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    map_location: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Read a checkpoint (any path `resolve_checkpoint` accepts) and restore model/optimizer in place.

    RNG states are returned, not applied: the caller restores them once everything that draws
    random numbers while setting up (data streams, workers) exists. Every problem (a damaged,
    mistyped or foreign file) is a CheckpointError naming the file; nothing in it runs code.
    """
    path = resolve_checkpoint(Path(directory))
    check_contained(path)
    record = _read_state_json(path)
    stream_state = record.get("stream")
    if record.get("stream_file") is not None:
        stream_state = safe_torch_load(_inside(path, record["stream_file"], "stream_file"))
    curriculum_path = path / "curriculum.yaml"
    try:
        curriculum = safe_yaml_load(read_yaml_file(curriculum_path)) or {}
    except (OSError, ValueError, yaml.YAMLError, FileRefused) as e:
        raise CheckpointError(f"{curriculum_path} is damaged: {one_line(e, 200)}") from None
    if not isinstance(curriculum, dict):
        raise CheckpointError(f"{curriculum_path} is damaged: expected a mapping")
    rng = _check_rng(safe_torch_load(path / "rng.pt"), path / "rng.pt")
    memory = safe_torch_load(path / "memory.pt") if (path / "memory.pt").exists() else None
    if model is not None:
        _restore_model(path / "model", model)
    if optimizer is not None:
        _restore_optimizer(path / "optimizer.pt", optimizer, map_location)
    state = {k: v for k, v in record.items() if k not in RESERVED_STATE_KEYS}
    return LoadedCheckpoint(
        path=path, state=state, stream_state=stream_state, curriculum=curriculum, rng=rng, memory=memory
    )


def _read_state_json(path: Path) -> dict:
    file = path / "state.json"
    try:
        record = read_json(file)
    except FileRefused as e:
        raise CheckpointError(f"{e} (the checkpoint is damaged)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} is damaged: {one_line(e, 200)}") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{file} is damaged: expected a JSON object, got {type(record).__name__}")
    stream_file = record.get("stream_file")
    if stream_file is not None and not isinstance(stream_file, str):
        raise CheckpointError(f"{file} is damaged: stream_file must be a file name, got {stream_file!r}")
    return record


def _inside(root: Path, name: str, key: str) -> Path:
    """`root/name` for a plain file name; anything that could point elsewhere is refused."""
    if not name or Path(name).is_absolute() or Path(name).name != name or name in (".", ".."):
        raise CheckpointError(f"{root / 'state.json'}: {key} must name a file inside the checkpoint, got {name!r}")
    return root / name


def check_contained(root: Path) -> None:
    """Refuse a checkpoint holding a symlink that leads outside it (it would make us read any file)."""
    top = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            if entry.is_symlink():
                target = entry.resolve()
                if target != top and top not in target.parents:
                    raise CheckpointError(f"{entry} is a symlink to {target}, outside the checkpoint: refused")


def _names_globals(file: Path) -> bool:
    """Whether the pickle in `file` (a torch zip's data.pkl, or the file itself) is a whole pickle that
    imports names (what runs code when unpickled). Read with pickletools, which executes nothing."""
    try:
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return False
                with archive.open(member) as stream:
                    return _imports_in(stream)
        with open(file, "rb") as stream:
            return _imports_in(stream)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):  # not a pickle: damaged
        return False


def _imports_in(stream: Any) -> bool:
    return any(op.name in ("GLOBAL", "STACK_GLOBAL", "INST") for op, _, _ in list(pickletools.genops(stream)))


def safe_torch_load(file: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load that can only rebuild tensors and plain containers: a crafted pickle runs nothing;
    a FIFO or a device in its place is refused before torch opens it (it would wait or read for ever)."""
    try:
        check_regular(file)
    except FileRefused as e:
        raise CheckpointError(f"{e} (the checkpoint is damaged)") from None
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning is noise beside the one line
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(file, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: the checkpoint is damaged") from None
    except pickle.UnpicklingError:  # torch's own message is many lines about weights_only=False: not an option
        if not _names_globals(file):  # garbage bytes fail the same way: that file is damaged, not dangerous
            raise CheckpointError(f"{file} is damaged: it is not a file tripletctl writes") from None
        raise CheckpointError(
            f"{file} holds objects that could run code when loaded (an older tripletctl "
            f"format or a tampered file); refusing to load it"
        ) from None
    except Exception as e:  # truncated zip, garbage bytes, wrong device...: torch raises many types
        raise CheckpointError(f"{file} is damaged: {one_line(e, 200)}") from None


def _check_rng(rng: Any, file: Path) -> dict | list[dict]:
    """What capture_rng wrote (or a list of them, one per rank), else a clear error now, not at resume."""

    def ok(state: Any) -> bool:
        return (
            isinstance(state, dict)
            and isinstance(state.get("python"), (list, tuple))
            and isinstance(state.get("torch"), torch.Tensor)
            and state["torch"].dtype == torch.uint8
        )

    if ok(rng) or (isinstance(rng, list) and rng and all(ok(s) for s in rng)):
        return rng
    raise CheckpointError(f"{file} is damaged: expected the random-number-generator states tripletctl writes")


def _restore_model(model_dir: Path, model: torch.nn.Module) -> None:
    """Copy saved weights into `model` (wherever its parameters live)."""
    try:
        saved, _ = load_model(model_dir, device="cpu")
    except ModelError as e:
        raise CheckpointError(f"checkpoint model in {model_dir} cannot be loaded: {e}") from None
    target = unwrap(model)
    try:  # part by part, so a torch.compile'd encoder inside `model` is fine too
        ours = (target.pooling, target.head_sizes, target.normalize)
        theirs = (saved.pooling, saved.head_sizes, saved.normalize)
        if ours != theirs:
            raise RuntimeError(f"(pooling, head, normalize) {ours} vs saved {theirs}")
        unwrap(target.encoder).load_state_dict(saved.encoder.state_dict(), strict=True)
        if target.head is not None:
            target.head.load_state_dict(saved.head.state_dict(), strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint model in {model_dir} does not match this model "
            f"(different architecture, pooling or head?): {one_line(e, 300)}"
        ) from None


def _restore_optimizer(path: Path, optimizer: torch.optim.Optimizer, map_location) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no optimizer state to resume from")
    state = safe_torch_load(path, map_location)
    try:
        optimizer.load_state_dict(state)
    except Exception as e:  # a foreign or mistyped file: ValueError, KeyError, TypeError...
        raise CheckpointError(f"optimizer state in {path} does not match this optimizer: {one_line(e, 200)}") from None
    for group in optimizer.param_groups:  # load_state_dict does not look at shapes; step() would crash
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.ndim and value.shape != param.shape:
                    raise CheckpointError(
                        f"optimizer state in {path} does not match this model: '{key}' has "
                        f"shape {tuple(value.shape)}, its parameter {tuple(param.shape)}"
                    )


# --------------------------------------------------------------------------------------- resolve


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, a phase dir (holding checkpoint/) or a run dir (latest phase) → checkpoint dir."""
    path = Path(path)
    if path.name == CHECKPOINT or _is_complete(path) or (path / "state.json").exists():
        found = _usable(path)
        if found is None:
            raise CheckpointError(
                f"{path} is not a complete checkpoint (a save was interrupted and no {_prev(path).name} survives)"
            )
        return found
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory: expected a checkpoint, phase or run directory")
    if (path / CHECKPOINT).exists() or _prev(path / CHECKPOINT).exists():
        found = _usable(path / CHECKPOINT)
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
        found = _usable(phase / CHECKPOINT)
        if found is not None:
            return found
    return None


def usable_dir(target: str | Path) -> Path | None:
    """A directory written by `write_complete_dir`, or its `.prev` after a crash mid-swap, or None."""
    return _usable(Path(target))


def _usable(target: Path) -> Path | None:
    """`checkpoint` if complete, else `checkpoint.prev` if complete (crash mid-swap), else None."""
    for candidate in (target, _prev(target)):
        if _is_complete(candidate):
            return candidate
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
