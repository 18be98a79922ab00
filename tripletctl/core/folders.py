"""What a model folder, checkpoint or run may hold before anything in it is read: no code, no way out.

A model folder may come from anywhere (a download, a colleague, a checkpoint someone sent). transformers
runs Python from a folder whose config.json or tokenizer_config.json has `auto_map` (with
`trust_remote_code`, after asking on a terminal), and every library follows symlinks. So each reader
of a folder calls `check_model_folder` first: custom code (`auto_map`, `.py` files) and symlinks that
lead outside the folder are refused in one line naming the file and the key, and the files that
transformers parses itself (config and tokenizer JSON, vocabularies) are bounded like every other
read (core/files.py). transformers is also always called with `trust_remote_code=False`, so it never
prompts and never reads stdin.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tripletctl.core.errors import TripletctlError
from tripletctl.core.files import MIB, FileRefused, check_regular, read_text

MAX_MODEL_FILE_BYTES = 64 * MIB  # config/tokenizer JSON, vocab.txt, merges.txt, sentencepiece models
# The files transformers parses itself from a model folder (the weights are bounded by their format).
_PARSED_SUFFIXES = (".json", ".txt", ".model")
_CODE_KEYS = ("auto_map",)  # config.json and tokenizer_config.json: classes to import from the folder
_CODE_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json")


class FolderRefused(TripletctlError):
    """A model folder, checkpoint or run that holds code or a symlink leading out of it."""


def refuse_escapes(folder: str | Path, what: str = "the model folder") -> None:
    """Refuse `folder` when any symlink in it (at any depth) leads outside it, or dangles: a reader
    would otherwise load (or `export` copy) any file on the machine."""
    root = Path(folder)
    top = _containing(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            if not entry.is_symlink():
                continue
            target = entry.resolve()
            if target != top and top not in target.parents:
                raise FolderRefused(f"{entry} is a symlink to {target}, outside {what} {root}: refused")
            if not target.exists():
                raise FolderRefused(f"{entry} is a dangling symlink (to {target}) in {what} {root}: refused")


def _containing(root: Path) -> Path:
    """The directory the symlinks of `root` must stay in: `root` itself, or for a snapshot of the
    hub cache (models--ORG--NAME/snapshots/HASH, whose files link to ../../blobs/) the cache's folder
    of that repository."""
    top = root.resolve()
    if top.parent.name == "snapshots" and top.parent.parent.name.startswith("models--"):
        return top.parent.parent
    return top


def refuse_code(folder: str | Path) -> None:
    """Refuse a folder that holds custom code: `auto_map` in its config or tokenizer config (at the
    top or in any module folder), or any `.py` file. Nothing is imported, ever."""
    root = Path(folder)
    for dirpath, _, filenames in os.walk(root):
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.endswith(".py"):
                raise FolderRefused(
                    f"{path}: a model folder holding Python code is refused (tripletctl never runs code "
                    "from a model folder); remove the .py files and any auto_map key"
                )
            if name in _CODE_FILES:
                key = _code_key(path)
                if key is not None:
                    raise FolderRefused(
                        f"{path}: key '{key}' names custom code to import from the folder; tripletctl never "
                        f"runs it (trust_remote_code=False): refused; use a model whose architecture "
                        f"transformers ships, without '{key}'"
                    )


def _code_key(path: Path) -> str | None:
    """The key of JSON file `path` that names code to import, or None (unreadable JSON is the
    loader's to report, in its own words)."""
    try:
        record = json.loads(read_text(path, MAX_MODEL_FILE_BYTES))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    return next((key for key in _CODE_KEYS if key in record), None)


def check_sizes(folder: str | Path) -> None:
    """Refuse a parsed file (JSON, vocabulary, sentencepiece model) that is not a regular file or is
    larger than `MAX_MODEL_FILE_BYTES`: transformers would read it whole, unbounded."""
    for dirpath, _, filenames in os.walk(Path(folder)):
        for name in filenames:
            if not name.endswith(_PARSED_SUFFIXES):
                continue
            path = Path(dirpath) / name
            check_regular(path)
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size > MAX_MODEL_FILE_BYTES:
                raise FileRefused(f"{path} is larger than {MAX_MODEL_FILE_BYTES // MIB} MiB: refused")


def check_model_folder(folder: str | Path, what: str = "the model folder") -> None:
    """Everything a reader checks before it reads a local model folder: no symlink out, no code,
    bounded files. A path that is not a directory (a hub name) is left to trust_remote_code=False."""
    if not Path(folder).is_dir():
        return
    refuse_escapes(folder, what)
    refuse_code(folder)
    check_sizes(folder)
