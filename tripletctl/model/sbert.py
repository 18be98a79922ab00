"""The sentence-transformers side of a saved model folder, written without sentence-transformers.

A folder that only holds a transformers encoder loads in `SentenceTransformer(path)` without an
error and silently gives the wrong embeddings (mean pooling, no head, no normalisation). So every
model folder also describes the whole pipeline in sentence-transformers' own layout:

    modules.json                       Transformer (the folder root) -> Pooling -> Dense... -> Normalize
    sentence_bert_config.json          max_seq_length (= data.max_length)
    config_sentence_transformers.json  similarity_fn_name (the training distance)
    1_Pooling/config.json              mean or cls
    K_Dense/config.json, model.safetensors   one per head layer; activation as an import path
    K_Normalize/config.json            when the model normalises

These are the long-standing file names and keys (`sentence_transformers.models.*`), which every
sentence-transformers release from 2.x to today reads; they are small JSON files and safetensors,
so tripletctl needs no sentence-transformers at run time. The Dense weights are the head's own
(tripletctl's loader reads them back from here: one copy, no drift between the two views).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tripletctl.core.files import FileRefused
from tripletctl.core.jsonio import read_json

MODULES_FILE = "modules.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"
TRANSFORMER_CONFIG_FILE = "sentence_bert_config.json"
POOLING_DIR = "1_Pooling"
WEIGHTS_FILE = "model.safetensors"
IDENTITY = "torch.nn.modules.linear.Identity"
# Declared, not read from the installed package: the release whose layout these files follow.
FORMAT_SENTENCE_TRANSFORMERS_VERSION = "3.0.0"

# Training distance -> sentence-transformers similarity_fn_name. Squared euclidean ranks exactly
# like euclidean, and sentence-transformers has no squared variant.
SIMILARITY = {"euclidean": "euclidean", "squared-euclidean": "euclidean"}


def activation_path(module: nn.Module) -> str:
    """The import path sentence-transformers re-instantiates with no arguments, so the module must
    equal its default construction (GELU() is exact GELU; GELU(approximate='tanh') is not)."""
    cls = type(module)
    if repr(cls()) != repr(module):
        raise ValueError(
            f"head activation {module!r} differs from {cls.__name__}() and cannot be "
            "expressed as a sentence-transformers Dense activation_function"
        )
    return f"{cls.__module__}.{cls.__qualname__}"


def head_layers(head: nn.Sequential | None) -> list[tuple[nn.Linear, str]]:
    """Each Linear of the head with the activation that follows it (Identity for the last)."""
    if head is None:
        return []
    modules = list(head)
    layers = []
    for i, module in enumerate(modules):
        if isinstance(module, nn.Linear):
            following = modules[i + 1] if i + 1 < len(modules) else None
            is_activation = following is not None and not isinstance(following, nn.Linear)
            layers.append((module, activation_path(following) if is_activation else IDENTITY))
    return layers


def write_modules(
    directory: Path,
    *,
    hidden_size: int,
    pooling: str,
    head: nn.Sequential | None,
    normalize: bool,
    max_seq_length: int,
    similarity: str,
) -> list[str]:
    """Write every sentence-transformers file beside the encoder; return the Dense directories."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
    ]
    _write_json(directory / TRANSFORMER_CONFIG_FILE, {"max_seq_length": int(max_seq_length), "do_lower_case": False})
    _write_json(
        directory / POOLING_DIR / "config.json",
        {
            "word_embedding_dimension": int(hidden_size),
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
    )
    dense_dirs = []
    for linear, activation in head_layers(head):
        index = len(modules)
        name = f"{index}_Dense"
        _write_json(
            directory / name / "config.json",
            {
                "in_features": linear.in_features,
                "out_features": linear.out_features,
                "bias": linear.bias is not None,
                "activation_function": activation,
            },
        )
        state = {f"linear.{k}": v.detach().contiguous().cpu() for k, v in linear.state_dict().items()}
        save_file(state, str(directory / name / WEIGHTS_FILE), metadata={"format": "pt"})
        modules.append({"idx": index, "name": str(index), "path": name, "type": "sentence_transformers.models.Dense"})
        dense_dirs.append(name)
    if normalize:
        index = len(modules)
        name = f"{index}_Normalize"
        _write_json(directory / name / "config.json", {})  # a file, so the folder survives git / hf upload
        modules.append(
            {"idx": index, "name": str(index), "path": name, "type": "sentence_transformers.models.Normalize"}
        )
    _write_json(directory / MODULES_FILE, modules)
    _write_json(
        directory / ST_CONFIG_FILE,
        {
            "__version__": {
                "sentence_transformers": FORMAT_SENTENCE_TRANSFORMERS_VERSION,
                "transformers": _version("transformers"),
                "pytorch": torch.__version__,
            },
            "prompts": {},
            "default_prompt_name": None,
            "similarity_fn_name": SIMILARITY.get(similarity, "euclidean"),
        },
    )
    return dense_dirs


def read_head_state(directory: Path, dense_dirs: list[str], head: nn.Sequential) -> dict[str, torch.Tensor]:
    """The head's state dict, gathered from its Dense modules (inverse of `write_modules`)."""
    linear_names = [name for name, module in head.named_children() if isinstance(module, nn.Linear)]
    if len(linear_names) != len(dense_dirs):
        raise ValueError(f"{directory}: {len(dense_dirs)} Dense modules for a head of {len(linear_names)} layers")
    state = {}
    for name, dense in zip(linear_names, dense_dirs):
        weights = load_file(str(directory / dense / WEIGHTS_FILE))
        for key, value in weights.items():
            state[f"{name}.{key.removeprefix('linear.')}"] = value
    return state


def check_modules(directory: Path) -> None:
    """Raise ValueError when modules.json or a module it names is missing or unreadable."""
    modules = _read_json(directory / MODULES_FILE)
    if not isinstance(modules, list) or not modules:
        raise ValueError(f"{directory / MODULES_FILE} lists no modules")
    _read_json(directory / ST_CONFIG_FILE)
    _read_json(directory / TRANSFORMER_CONFIG_FILE)
    for module in modules:
        path = module.get("path") if isinstance(module, dict) else None
        if path:
            _read_json(directory / path / "config.json")
            if module.get("type", "").endswith(".Dense") and not (directory / path / WEIGHTS_FILE).is_file():
                raise ValueError(f"{directory / path} has no {WEIGHTS_FILE}")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _read_json(path: Path):
    try:
        return read_json(path)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, FileRefused) as e:
        raise ValueError(f"{path} is unreadable: {e}") from None


def _write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
