"""What `eval`, `compare` and `inspect-collapse` read: a model (a checkpoint, a phase or run directory,
or a model folder or hub name) with the length, distance and margin it was trained with, and the
held-out rows: the source options given on the command line, else the eval block saved with the
run's curriculum. The rows are read before the model is loaded, so bad input fails fast. The
Python API (`tripletctl.evaluate`, `tripletctl.load`) reads them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tripletctl.config.block_checks import source_from_options
from tripletctl.config.blocks import SourceConfig
from tripletctl.config.validate import load_eval_block
from tripletctl.config.yaml_io import read_yaml_file, safe_yaml_load
from tripletctl.core.errors import CheckpointError, DataError, ModelError
from tripletctl.data.sources import read_rows
from tripletctl.evaluation.retrieval import DEFAULT_MAX_LENGTH
from tripletctl.model.encoder import load_any_model, load_model, model_folder
from tripletctl.outputs.checkpoint_find import resolve_checkpoint
from tripletctl.outputs.checkpoint_load import check_contained


def resolve_device(device: str) -> str:
    """ "auto" means CUDA when present; asking for CUDA without it is a user error, not a crash."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"--device {device} requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise CheckpointError(f"unknown device {device!r}: use auto, cpu or cuda")
    return device


@dataclass
class ModelAndRows:
    """Everything `eval` and `inspect-collapse` need: model, tokenizer, rows and training settings."""

    checkpoint_dir: Path
    model: Any
    tokenizer: Any
    rows: Any  # data.LabelledRows
    device: str
    max_length: int  # data.max_length the model was trained with (128 when unknown)
    distance: str  # distance of the last phase ("euclidean" when unknown)
    margin: float | None  # margin of the last phase (None when unknown)
    length_from: str = "the run's data.max_length"  # where max_length comes from, for the notice eval prints


def _training_settings(checkpoint_dir: Path) -> dict[str, Any]:
    """max_length / distance / margin from the checkpoint's curriculum.yaml, when it is readable."""
    settings: dict[str, Any] = {"max_length": DEFAULT_MAX_LENGTH, "distance": "euclidean", "margin": None}
    path = checkpoint_dir / "curriculum.yaml"
    if not path.is_file():
        return settings
    try:
        plan = safe_yaml_load(read_yaml_file(path)) or {}
    except Exception:  # an unreadable copy must not block evaluation
        return settings
    if not isinstance(plan, dict):
        return settings
    data = plan.get("data") or {}
    train = plan.get("train") or {}
    phases = plan.get("phases") or []
    last = phases[-1] if phases and isinstance(phases[-1], dict) else {}
    if isinstance(data.get("max_length"), int):
        settings["max_length"] = data["max_length"]
    settings["distance"] = last.get("distance") or train.get("distance") or "euclidean"
    if isinstance(last.get("margin"), (int, float)):
        settings["margin"] = float(last["margin"])
    return settings


def held_out_source(
    checkpoint: Path | str,
    given: dict[str, Any],
    option_names: dict[str, str],
    max_rows: int | None,
    default_max_rows: int,
) -> tuple[SourceConfig, int]:
    """The rows `eval` / `inspect-collapse` read: the source options given on the command line, or,
    without --data, the eval block saved with the run's curriculum (the options given change it)."""
    if given.get("source") is not None:  # the run's own column names unless given (a model folder has none)
        base = _saved_columns(checkpoint, given["source"]) if model_folder(checkpoint) is None else None
        return source_from_options(given, option_names, base=base), max_rows or default_max_rows
    if model_folder(checkpoint) is not None:
        raise DataError(
            f"{checkpoint} is a model folder, which holds no held-out data: pass {option_names['source']} SOURCE"
        )
    checkpoint_dir = Path(resolve_checkpoint(Path(checkpoint)))
    check_contained(checkpoint_dir)  # before its curriculum.yaml is read
    path = checkpoint_dir / "curriculum.yaml"
    if not path.is_file():
        raise DataError(
            f"{checkpoint_dir} holds no curriculum.yaml to take an eval block from: "
            f"pass {option_names['source']} SOURCE"
        )
    saved = load_eval_block(path)
    if saved is None:
        raise DataError(
            f"the curriculum saved with {checkpoint_dir} has no eval block: "
            f"pass {option_names['source']} SOURCE (and {option_names['layout']} if it is not labelled)"
        )
    return source_from_options(given, option_names, base=saved), max_rows or saved.max_rows


def _saved_columns(checkpoint: Path | str, source: Any) -> SourceConfig | None:
    """The layout and column names of the run's eval block (else its data block), on another source:
    `eval RUN --data f.jsonl` reads f.jsonl the way the run read its own data."""
    try:
        checkpoint_dir = Path(resolve_checkpoint(Path(checkpoint)))
        check_contained(checkpoint_dir)  # refused again, in one line, when the model is loaded
        path = checkpoint_dir / "curriculum.yaml"
        saved = load_eval_block(path) or load_eval_block(path, block="data")
    except Exception:  # no run, or an unreadable copy: the options' defaults
        return None
    if saved is None:
        return None
    keys = ("layout", "text_column", "label_column", "anchor_column", "positive_column", "negative_columns")
    return SourceConfig(source=source, **{key: getattr(saved, key) for key in keys})


def load_checkpoint_and_rows(
    checkpoint: Path | str,
    source: SourceConfig,
    max_rows: int | None = None,
    device: str = "auto",
    rows: Any = None,
) -> ModelAndRows:
    """Resolve a checkpoint (phase checkpoint, phase dir or run dir) or a model folder (tripletctl's
    export, any sentence-transformers folder or hub name), read the rows (bad input fails before the
    model is loaded), then load its model. `rows` already read (`compare`'s second model) are kept."""
    device = resolve_device(device)
    folder = model_folder(checkpoint)
    if folder is not None:
        rows = read_rows(source, limit=max_rows) if rows is None else rows
        model, tokenizer, length = load_any_model(folder, device)
        said = "the folder's max_seq_length" if length else "the tokenizer's model_max_length (at most 512)"
        length = length or min(int(getattr(tokenizer, "model_max_length", DEFAULT_MAX_LENGTH)), 512)
        return ModelAndRows(folder, model, tokenizer, rows, device, length, "euclidean", None, said)
    checkpoint_dir = Path(resolve_checkpoint(Path(checkpoint)))
    check_contained(checkpoint_dir)
    model_dir = checkpoint_dir / "model"
    if not model_dir.is_dir():
        raise CheckpointError(f"{checkpoint_dir} has no model/ directory")
    rows = read_rows(source, limit=max_rows) if rows is None else rows
    try:
        model, tokenizer = load_model(model_dir, device=device)
    except ModelError as error:  # not a tripletctl model, truncated or mismatched files
        raise CheckpointError(f"cannot load the model in {model_dir}: {error}") from None
    settings = _training_settings(checkpoint_dir)
    return ModelAndRows(checkpoint_dir, model, tokenizer, rows, device, **settings)
