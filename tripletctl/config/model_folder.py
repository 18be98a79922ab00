"""What a local model folder says about itself, read from its JSON files only (no torch): whether it
holds weights, whether it is a sentence-transformers model (modules.json) and with which pooling and
Dense layers, its hidden size and length limits, and the hub id it was cached from.

`init` sizes a curriculum from these facts; `validate` and `train` warn with `head_warning` when a
curriculum puts a new random head on a pretrained sentence model (docs/curricula.md, `head`).
model/sbert.py reads the same files to build the model; this module only describes them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tripletctl.config.blocks import ModelConfig
from tripletctl.core.errors import TripletctlError
from tripletctl.core.folders import MAX_MODEL_FILE_BYTES
from tripletctl.core.jsonio import read_json

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_CACHE_DIR = re.compile(r"^models--([A-Za-z0-9][\w.-]*)--([\w.-]+)$")  # the hub cache: models--ORG--NAME
SENTENCE_TRANSFORMERS_ORG = "sentence-transformers/"


@dataclass(frozen=True)
class FolderFacts:
    path: str
    has_weights: bool
    sentence_transformers: bool  # modules.json: pooling (and Dense layers) are part of the model
    pooling: str | None  # the Pooling module's mode (mean, cls, ...), None without one
    dense: tuple[int, ...]  # out_features of its Dense modules, in order
    hidden_size: int | None
    max_positions: int | None  # config.json max_position_embeddings
    max_seq_length: int | None  # sentence_bert_config.json, else tokenizer_config.json, when they say
    hub_id: str | None  # ORG/NAME when the folder sits in the hub cache (models--ORG--NAME/snapshots/...)


def _json(path: Path) -> dict:
    """A JSON object of the folder, bounded (a FIFO or an oversized file reads as nothing here: the
    loader refuses it in one line, core/folders.py)."""
    try:
        value = read_json(path, MAX_MODEL_FILE_BYTES)
    except (OSError, ValueError, TripletctlError):
        return {}
    return value if isinstance(value, dict) else {}


def _modules(folder: Path) -> list[dict]:
    try:
        modules = read_json(folder / "modules.json", MAX_MODEL_FILE_BYTES)
    except (OSError, ValueError, TripletctlError):
        return []
    return [m for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []


def _pooling(config: dict) -> str | None:
    mode = config.get("pooling_mode")
    if isinstance(mode, str):
        return mode
    flags = [k.removeprefix("pooling_mode_") for k, v in config.items() if k.startswith("pooling_mode_") and v]
    return {"mean_tokens": "mean", "cls_token": "cls"}.get(flags[0], flags[0]) if len(flags) == 1 else None


def hub_id_of(folder: str | os.PathLike) -> str | None:
    """ORG/NAME of a folder inside the Hugging Face hub cache (…/models--ORG--NAME/snapshots/HASH)."""
    for part in reversed(Path(os.path.abspath(folder)).parts):
        match = _CACHE_DIR.match(part)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return None


def folder_facts(name: str | os.PathLike) -> FolderFacts | None:
    """The facts of a local model folder; None when `name` is not a local directory (a hub name)."""
    folder = Path(name)
    if not folder.is_dir():
        return None
    config = _json(folder / "config.json")
    modules = _modules(folder)
    pooling, dense = None, []
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        path = folder / str(module.get("path", ""))
        if kind == "Pooling":
            pooling = _pooling(_json(path / "config.json"))
        elif kind == "Dense":
            size = _json(path / "config.json").get("out_features")
            if isinstance(size, int):
                dense.append(size)
    length = _json(folder / "sentence_bert_config.json").get("max_seq_length")  # else the tokenizer's (recent ST)
    if not isinstance(length, int):
        length = _json(folder / "tokenizer_config.json").get("model_max_length")
        length = length if isinstance(length, int) and length < 100_000 else None  # "unlimited" is 1e30
    hidden = config.get("hidden_size", config.get("dim", config.get("d_model")))
    positions = config.get("max_position_embeddings")
    return FolderFacts(
        path=str(folder),
        has_weights=any((folder / f).is_file() for f in WEIGHT_FILES),
        sentence_transformers=bool(modules),
        pooling=pooling,
        dense=tuple(dense),
        hidden_size=hidden if isinstance(hidden, int) else None,
        max_positions=positions if isinstance(positions, int) else None,
        max_seq_length=length if isinstance(length, int) and length > 0 else None,
        hub_id=hub_id_of(folder),
    )


def head_warning(model: ModelConfig) -> str | None:
    """One line when `model.head` puts new, random layers on a pretrained sentence-transformers model
    (a local folder without Dense layers, or a hub name of the sentence-transformers organisation):
    training starts below the model's own zero-shot quality (docs/curricula.md, `head`)."""
    if not model.head or model.init != "pretrained":
        return None
    facts = folder_facts(model.name)
    if facts is not None and (not facts.sentence_transformers or facts.dense):
        return None  # a plain encoder needs no warning; Dense layers are the head training continues from
    if facts is None and not model.name.startswith(SENTENCE_TRANSFORMERS_ORG):
        return None
    return (
        f"model.head {list(model.head)} adds randomly initialised layers on top of the pretrained sentence "
        f"model {model.name}: its embeddings start below the model's own zero-shot quality "
        f"(docs/curricula.md, head); set model.head: [] to fine-tune the model as it is"
    )
