"""Loading a checkpoint, which is untrusted input (it may come from anywhere): loading runs no code
from it. Tensors load with `torch.load(weights_only=True)`, weights from safetensors, the rest is
JSON/YAML; every file read must lie inside the checkpoint directory (no absolute `stream_file`, no
`..`, no symlink out). A damaged, mistyped or foreign file is one `CheckpointError` naming it; a
pickle that imports names is refused as possibly code. The format is checkpoint_save.py's.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from tripletctl.config.yaml_io import read_yaml_file, safe_yaml_load
from tripletctl.core.errors import CheckpointError, ModelError, one_line
from tripletctl.core.files import FileRefused, check_regular
from tripletctl.core.jsonio import read_json
from tripletctl.model.encoder import load_model, unwrap
from tripletctl.outputs.checkpoint_find import resolve_checkpoint
from tripletctl.outputs.checkpoint_save import RESERVED_STATE_KEYS


@dataclass
class LoadedCheckpoint:
    path: Path  # the checkpoint directory actually read (may be checkpoint.prev)
    state: dict  # the `state` dict given to save_checkpoint
    stream_state: dict | None
    curriculum: dict
    rng: dict | list[dict]  # pass to restore_rng when ready; a list holds one state per rank (torchrun)
    memory: dict | None = None  # EmbeddingMemory.state_dict() when the phase had a memory
    centroids: dict | None = None  # ClassCentroids.state_dict() when a phase has batch_classes: neighbours
    mined: dict | None = None  # MinedTable.state_dict() when the open phase has mined_negatives

    @property
    def model_dir(self) -> Path:
        return self.path / "model"


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
    centroids = safe_torch_load(path / "centroids.pt") if (path / "centroids.pt").exists() else None
    mined = safe_torch_load(path / "mined.pt") if (path / "mined.pt").exists() else None
    if model is not None:
        _restore_model(path / "model", model)
    if optimizer is not None:
        _restore_optimizer(path / "optimizer.pt", optimizer, map_location)
    state = {k: v for k, v in record.items() if k not in RESERVED_STATE_KEYS}
    return LoadedCheckpoint(
        path=path,
        state=state,
        stream_state=stream_state,
        curriculum=curriculum,
        rng=rng,
        memory=memory,
        centroids=centroids,
        mined=mined,
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
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, MemoryError, OverflowError):  # not a pickle:
        return False  # damaged (garbage that reads as a length of 2^62 bytes is a MemoryError)


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
